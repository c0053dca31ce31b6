"""Decontamination (lesson 18a, stage 4): drop a training prompt that shares a word n-gram with an eval set.

    contaminated(x) iff  ngrams_n(tokens(x)) ∩ ∪_{e in eval} ngrams_n(tokens(e)) ≠ ∅     for n in (8, 13)

n = 8 is open-r1's `scripts/decontaminate.py`, n = 13 the GPT-3 / NeMo Curator setting; each eval set is
named, and the report says which set and which n caught each row. Tokens are dedup's normalised words
(rlpt.data.dedup.tokens: lowercase, one spelling per number, sorted terms), so whitespace, 3/4 vs 0.75 and a
reordered sum do not hide a leaked eval row. n counts words (tokens with a letter or digit); an n-gram
holds the symbols between its words. A text of at most n words is one n-gram, its whole self: arithmetic
prompts (`<3+4+5+6+7+8>`, six words) match only exactly, as the arithmetic task's multiset split needs. What
this misses: a paraphrase with other words (the course's "5 % -> 95 % on an untouched topic" test is what
catches those).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rlpt.data.dedup import Removed, tokens, word_ngrams
from rlpt.data.prompts import PromptRow


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The word n-grams of tokens(text) (rlpt.data.dedup.word_ngrams: n words with the symbols between them; the
    whole text if it has at most n words). n counts words, as in GPT-3's and open-r1's n-grams: counting `+` and
    `<` as words made a 6-operand sum's 8-grams four sorted terms long, and one of them matched the run of some
    held-out sum (568 of 1,385 distinct training sums of 2-6 operands flagged against 200 held-out ones; 0 now, as
    the task's multiset split promises)."""
    return set(word_ngrams(tokens(text), n))


@dataclass
class EvalIndex:
    """The n-grams of every named eval set, for each n."""
    ns: tuple[int, ...] = (8, 13)
    grams: dict[tuple[str, int], set[tuple[str, ...]]] = field(default_factory=dict)

    def add(self, name: str, texts: list[str]) -> None:
        for n in self.ns:
            g = self.grams.setdefault((name, n), set())
            for t in texts:
                g |= ngrams(t, n)

    def hits(self, text: str) -> list[tuple[str, int]]:
        """(eval set, n) for every set and n that shares an n-gram with `text`."""
        mine = {n: ngrams(text, n) for n in self.ns}
        return [(name, n) for (name, n), g in self.grams.items() if not mine[n].isdisjoint(g)]


def decontaminate(rows: list[PromptRow], index: EvalIndex) -> tuple[list[PromptRow], list[Removed]]:
    kept, removed = [], []
    for r in rows:
        hits = index.hits(r.prompt)
        if hits:
            removed.append(Removed(r, "overlaps " + ", ".join(f"{name} ({n}-gram)" for name, n in hits)))
        else:
            kept.append(r)
    return kept, removed
