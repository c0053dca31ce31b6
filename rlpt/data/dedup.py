"""Deduplication (lesson 18a, stage 4): exact on normalised text, then near-duplicates with MinHash LSH.

    tokens(x)   = lowercase words, numbers and single symbols; a fraction a/b that ends as a decimal is that
                  decimal (3/4 -> 0.75); the terms of a +/× chain are sorted (3 + 12 + 0.75 = 0.75 + 12 + 3)
    shingles(x) = the multiset of word n-grams of tokens(x) (n = 3 words with the symbols between them; a
                  text of at most 3 words is one shingle)
    near-dup    iff  Jaccard(shingles(x), shingles(y)) >= threshold   (0.8 default, 0.7 aggressive)

MinHash (Broder 1997) estimates Jaccard from `num_perm` min-hashes; LSH (datasketch.MinHashLSH) bands them so
each row only meets the earlier rows likely above the threshold, and the exact Jaccard of those few decides.
The first row of a duplicate cluster is kept.
Why words and not characters: the prompts here are short and made of numbers; one changed digit is one
changed word (three changed 3-grams) but as few as a fifth of a long text's character 5-grams, so distinct
problems that share a template would pass the threshold as duplicates.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

from rlpt.data.prompts import PromptRow

_TOKEN = re.compile(r"\d+\.\d+|\d+\s*/\s*\d+|\d+|\.\d+|[^\W\d_]+|[^\s\w]", re.UNICODE)
_NUM = re.compile(r"\d+(?:\.\d+)?|\.\d+")
COMMUTATIVE = {"+", "*", "×"}
# a chain's terms may be sorted unless a neighbour binds one of its ends: 2 - 3 + 4, 2 * 3 + 4, 2 / 3 * 4
BINDS_BEFORE = {"+": {"-", "*", "×", "/", "^"}, "*": {"/", "^"}, "×": {"/", "^"}}
BINDS_AFTER = {"+": {"*", "×", "/", "^"}, "*": {"^"}, "×": {"^"}}


def _number(tok: str) -> str:
    """A numeric token in one spelling: 3/4 -> 0.75, 06 -> 6, 2.50 -> 2.5, 1/3 stays 1/3 (no finite decimal)."""
    if "/" in tok:
        a, b = (int(x) for x in tok.split("/"))
        if b == 0:
            return f"{a}/0"
        f = Fraction(a, b)
        d = f.denominator
        for p in (2, 5):
            while d % p == 0:
                d //= p
        if d != 1:
            return f"{f.numerator}/{f.denominator}"
        tok = str(f.numerator / f.denominator) if f.denominator != 1 else str(f.numerator)
    if "." in tok:
        tok = tok.rstrip("0").rstrip(".") if tok.rstrip("0").rstrip(".") else "0"
        if tok.startswith("."):
            tok = "0" + tok
    return str(int(tok)) if tok.isdigit() else tok


def tokens(text: str) -> list[str]:
    """The normalised token sequence of `text` (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower()
    toks = [_number(t.replace(" ", "")) if t[0].isdigit() or t[0] == "." and len(t) > 1 else t
            for t in _TOKEN.findall(text)]
    out, i = [], 0
    while i < len(toks):                 # a chain NUM op NUM op ... NUM with one commutative op: sort its terms
        j = i
        op = toks[i + 1] if _is_num(toks[i]) and i + 1 < len(toks) and toks[i + 1] in COMMUTATIVE else None
        while op and j + 2 < len(toks) and toks[j + 1] == op and _is_num(toks[j + 2]):
            j += 2
        before, after = (toks[i - 1] if i else ""), (toks[j + 1] if j + 1 < len(toks) else "")
        if j > i and before not in BINDS_BEFORE[op] and after not in BINDS_AFTER[op]:
            terms = sorted(toks[i:j + 1:2], key=_sort_key)
            out += [x for t in terms for x in (op, t)][1:]
            i = j + 1
        else:
            out.append(toks[i])
            i += 1
    return out


def _is_num(t: str) -> bool:
    return bool(_NUM.fullmatch(t)) or ("/" in t and t[0].isdigit())


def _sort_key(t: str) -> tuple:
    a, _, b = t.partition("/")
    return (float(Fraction(a) / Fraction(b)) if b and int(b) else float(a), t)


def normalise(text: str) -> str:
    """The text every dedup decision reads: its normalised tokens joined by single spaces."""
    return " ".join(tokens(text))


def word_ngrams(t: list[str], n: int) -> list[tuple[str, ...]]:
    """The spans of `t` that hold n consecutive words (a word: a token with a letter or a digit) and the symbols
    between them; the whole of `t` if it has at most n words. n counts words, not `+` or `<`: counted as words,
    the symbols made two 6-operand sums that differ in one term share 9 of 11 token 3-grams (Jaccard 0.82), so
    237 of 2,367 distinct 2-6-operand sums were dropped as near-duplicates; in words they share at most 3 of 4."""
    words = [i for i, x in enumerate(t) if any(c.isalnum() for c in x)]
    if len(words) <= n:
        return [tuple(t)]
    return [tuple(t[words[i]:words[i + n - 1] + 1]) for i in range(len(words) - n + 1)]


def shingles(text: str, n: int = 3) -> set[str]:
    """The word n-grams of tokens(text) (`word_ngrams`) as a multiset: a repeated n-gram is counted (`1 + 1 + 1`,
    `1 + 1 + 1#2`), or <0+1+1+1+6> and <0+1+1+6> would be more alike as sets. A text of at most n words is one
    shingle."""
    grams = [" ".join(g) for g in word_ngrams(tokens(text), n)]
    seen: dict[str, int] = {}
    out = set()
    for g in grams:
        seen[g] = seen.get(g, 0) + 1
        out.add(g if seen[g] == 1 else f"{g}#{seen[g]}")
    return out


@dataclass
class Removed:
    """A row a stage dropped, and why (the other row it duplicates, the eval set it overlaps, its p̂...)."""
    row: PromptRow
    reason: str


def exact_dedup(rows: list[PromptRow]) -> tuple[list[PromptRow], list[Removed]]:
    """Keep the first row of each normalised prompt text."""
    first: dict[str, PromptRow] = {}
    kept, removed = [], []
    for r in rows:
        key = hashlib.blake2b(normalise(r.prompt).encode(), digest_size=16).hexdigest()
        if key in first:
            removed.append(Removed(r, f"same normalised text as {first[key].id}"))
        else:
            first[key] = r
            kept.append(r)
    return kept, removed


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_dedup(rows: list[PromptRow], threshold: float = 0.8, num_perm: int = 128, n: int = 3,
               seed: int = 1) -> tuple[list[PromptRow], list[Removed]]:
    """Keep a row unless an earlier kept row is an LSH candidate whose exact shingle Jaccard is >= threshold."""
    from datasketch import MinHash, MinHashLSH
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    blank = MinHash(num_perm=num_perm, seed=seed)       # copied per row: its permutations are drawn once
    sets: dict[str, set[str]] = {}
    kept, removed = [], []
    for r in rows:
        sh = shingles(r.prompt, n)
        m = blank.copy()
        m.update_batch([s.encode() for s in sorted(sh)])
        # the bands only propose candidates; the exact Jaccard of the kept shingle sets decides, so MinHash's
        # estimation error (sd ~ 0.04 at 128 permutations) adds no false positive, only the bands' misses
        match = [(jaccard(sets[c], sh), c) for c in lsh.query(m)]
        match = [mc for mc in match if mc[0] >= threshold]
        if match:
            j, best = max(match)
            removed.append(Removed(r, f"near-duplicate of {best} (Jaccard {j:.2f})"))
        else:
            lsh.insert(r.id, m)
            sets[r.id] = sh
            kept.append(r)
    return kept, removed
