"""Test-time search over the engine: spend more generated tokens, pick a better answer (lesson 17).

    greedy              one answer at temperature 0
    majority            N samples, the most frequent final answer (self-consistency)
    best_of_n           N samples, the one whose aggregated score is highest (agg: last | min | prod of step scores)
    weighted_best_of_n  N samples, the answer with the largest *sum* of scores (search-and-learn's default)
    beam_search         step by step: keep `width` partial chains, spend n sampled steps per iteration on them
                        (the root takes all n, then n/width each), keep the top `width` by the PRM's prefix score
    dvts                `subtrees` independent beams of width 1, each expanding n/subtrees steps and keeping
                        its best (Beeching et al., search-and-learn: diversity at large N)

Every strategy takes a list of prompts (beams stay per prompt: search-and-learn issue #26 pooled them
across prompts) and returns one `SearchResult` each, with the tokens it generated for that prompt: the
budget. Compare strategies at equal generated tokens, not equal N (the lesson's widget compares unequal
budgets; a beam of width B with K = 1 spends ~N step-samples where best-of-N spends N·steps).

A step is generated with `SamplingParams(stop_token_ids=[","])`: the engine stops on the delimiter and
keeps it in `token_ids`; all of a prompt's expansions of one beam are one request with n = K (one
prefill, K forks), and the engine's radix cache keeps each beam's prefix across iterations of one call.
The last allowed iteration generates to the end of the turn. Mapping to search-and-learn: its
`beam_width` is the expansions per beam (here n / width), its n / beam_width survivors are `width`.

MCTS is not here: on a 3-5 step chain with a PRM, UCB selection has little tree to search, and
the lesson calls it "mostly a research artifact"; DVTS covers the diverse-tree end of the spectrum.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from rlpt.engine.sampling import SamplingParams
from rlpt.gpt_mini.task import last_integer, parse_prompt
from rlpt.search.steps import SEP, is_complete

AGGS = ("last", "min", "prod")
STRATEGIES = ("greedy", "majority", "best_of_n", "weighted_best_of_n", "beam", "dvts")


@dataclass
class SearchResult:
    prompt: str
    text: str               # the chosen response
    tokens: int             # tokens generated for this prompt (the budget spent)
    correct: bool           # the verifier on the chosen answer (ground truth, never an input to the search)
    score: float | None = None   # the scorer's value of the chosen response, where the strategy used one

    @property
    def answer(self) -> int | None:
        return last_integer(self.text)


def _result(prompt: str, text: str, tokens: int, score: float | None = None) -> SearchResult:
    return SearchResult(prompt, text, tokens, last_integer(text) == parse_prompt(prompt).gold, score)


def aggregate(scores: list[float], agg: str) -> float:
    """A response's step scores -> one number: the last (the prefix that is the whole response), the min
    (the weakest step) or the product (all steps right, if they were independent). No step: 0."""
    if not scores:
        return 0.0
    if agg == "last":
        return scores[-1]
    if agg == "min":
        return min(scores)
    if agg == "prod":
        return math.prod(scores)
    raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")


def _seed(seed: int, *coords: int) -> int:
    """A request's seed from the search seed and its coordinates: the same draws in any batch."""
    for c in coords:
        seed = (seed * 1_000_003 + c + 1) % (2 ** 62)
    return seed


# -- whole samples --------------------------------------------------------------------------------------
@dataclass
class Samples:
    """N complete samples for one prompt: texts (EOS kept) and the tokens each took."""
    prompt: str
    texts: list[str]
    tokens: list[int]

    def first(self, n: int) -> Samples:
        return Samples(self.prompt, self.texts[:n], self.tokens[:n])


def sample(llm, prompts: list[str], n: int, temperature: float = 0.8, max_tokens: int = 40,
           seed: int = 0) -> list[Samples]:
    """n samples per prompt, one request each (the prompt prefilled once, n forks)."""
    sps = [SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=_seed(seed, i))
           for i in range(len(prompts))]
    outs = llm.generate(prompts, sps)
    return [Samples(p, [llm.tokenizer.decode(c.token_ids) for c in o.outputs], [len(c.token_ids) for c in o.outputs])
            for p, o in zip(prompts, outs)]


def greedy(llm, prompts: list[str], max_tokens: int = 40) -> list[SearchResult]:
    s = sample(llm, prompts, 1, temperature=0.0, max_tokens=max_tokens)
    return [_result(x.prompt, x.texts[0], x.tokens[0]) for x in s]


def pick_majority(s: Samples) -> SearchResult:
    """The most frequent final answer (first seen wins a tie); its first sample is the chosen text."""
    answers = [last_integer(t) for t in s.texts]
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return _result(s.prompt, s.texts[0], sum(s.tokens))
    top = max(counts.values())
    best = next(a for a in answers if a is not None and counts[a] == top)
    return _result(s.prompt, s.texts[answers.index(best)], sum(s.tokens))


def pick_best(s: Samples, scores: list[list[float]], agg: str = "last") -> SearchResult:
    """The sample with the highest aggregated score (first wins a tie)."""
    agg_scores = [aggregate(x, agg) for x in scores]
    i = max(range(len(s.texts)), key=lambda j: (agg_scores[j], -j))
    return _result(s.prompt, s.texts[i], sum(s.tokens))


def pick_weighted(s: Samples, scores: list[list[float]], agg: str = "last") -> SearchResult:
    """The final answer with the largest sum of aggregated scores over the samples that give it."""
    total: dict[int, float] = {}
    for t, x in zip(s.texts, scores):
        a = last_integer(t)
        if a is not None:
            total[a] = total.get(a, 0.0) + aggregate(x, agg)
    if not total:
        return _result(s.prompt, s.texts[0], sum(s.tokens))
    best = max(total, key=lambda a: total[a])     # dicts keep first-seen order: ties go to the first
    return _result(s.prompt, next(t for t in s.texts if last_integer(t) == best), sum(s.tokens))


def score_samples(scorer, samples: list[Samples]) -> list[list[list[float]]]:
    """Per prompt, per sample: the scorer's step scores (one batched call)."""
    flat = scorer.score([(s.prompt, t) for s in samples for t in s.texts])
    out, i = [], 0
    for s in samples:
        out.append(flat[i:i + len(s.texts)])
        i += len(s.texts)
    return out


def majority(llm, prompts: list[str], n: int, temperature: float = 0.8, max_tokens: int = 40,
             seed: int = 0) -> list[SearchResult]:
    return [pick_majority(s) for s in sample(llm, prompts, n, temperature, max_tokens, seed)]


def best_of_n(llm, scorer, prompts: list[str], n: int, agg: str = "last", temperature: float = 0.8,
              max_tokens: int = 40, seed: int = 0) -> list[SearchResult]:
    s = sample(llm, prompts, n, temperature, max_tokens, seed)
    return [pick_best(x, sc, agg) for x, sc in zip(s, score_samples(scorer, s))]


def weighted_best_of_n(llm, scorer, prompts: list[str], n: int, agg: str = "last", temperature: float = 0.8,
                       max_tokens: int = 40, seed: int = 0) -> list[SearchResult]:
    s = sample(llm, prompts, n, temperature, max_tokens, seed)
    return [pick_weighted(x, sc, agg) for x, sc in zip(s, score_samples(scorer, s))]


# -- step-level search ----------------------------------------------------------------------------------
@dataclass
class Beam:
    text: str               # the response so far (steps with their delimiters)
    score: float = 0.0      # the scorer's value of this prefix (its last step score)
    done: bool = False      # ended its turn, ran out of room, or hit the step-token cap mid-step


def beam_search(llm, scorer, prompts: list[str], n: int, width: int, temperature: float = 0.8,
                max_steps: int = 8, step_tokens: int = 16, max_tokens: int = 40, seed: int = 0,
                tree: int = 0) -> list[SearchResult]:
    """Step-level beam search: per prompt keep `width` prefixes; every iteration spends n sampled steps,
    split evenly over the unfinished prefixes (the root gets all n; then n / width each; one request per
    prefix, n = its share); all candidates (finished ones carried) are scored
    by the scorer at their last delimiter and the top `width` survive. Ends when every survivor is
    finished or after `max_steps` iterations (the last one generates to the end of the turn); the answer
    is the best-scoring finished beam. `tree` only offsets the seeds (DVTS's subtree index)."""
    if width < 1 or n < width:
        raise ValueError(f"beam search needs 1 <= width <= n, got width={width}, n={n}")
    sep = llm.tokenizer.stoi[SEP]
    room = llm.max_seq_len if hasattr(llm, "max_seq_len") else 10 ** 9
    beams = {p: [Beam("")] for p in prompts}
    spent = dict.fromkeys(prompts, 0)
    for it in range(max_steps):
        last = it == max_steps - 1
        reqs, sps, owners = [], [], []
        for pi, p in enumerate(prompts):
            for b in beams[p]:
                used = len(llm.tokenizer.encode(b.text))
                if min(max_tokens - used, room - 1 - len(llm.tokenizer.encode(p)) - used) <= 0:
                    b.done = True
            active = [b for b in beams[p] if not b.done]
            for bi, b in enumerate(active):
                K = n // len(active) + (bi < n % len(active))   # n step-samples per iteration, split evenly
                used = len(llm.tokenizer.encode(b.text))
                left = min(max_tokens - used, room - 1 - len(llm.tokenizer.encode(p)) - used)
                reqs.append(p + b.text)
                owners.append((p, b))
                sps.append(SamplingParams(n=K, temperature=temperature,
                                          max_tokens=left if last else min(step_tokens, left),
                                          stop_token_ids=[] if last else [sep], seed=_seed(seed, tree, pi, it, bi)))
        if not reqs:
            break
        cands = {p: [b for b in beams[p] if b.done] for p in prompts}
        fresh = []
        for (p, b), out in zip(owners, llm.generate(reqs, sps)):
            for c in out.outputs:
                spent[p] += len(c.token_ids)
                text = b.text + llm.tokenizer.decode(c.token_ids)
                step_done = bool(c.token_ids) and c.token_ids[-1] == sep
                cands[p].append(Beam(text, done=is_complete(text) or not step_done))
                fresh.append((p, cands[p][-1]))
        for (_, c), sc in zip(fresh, scorer.score([(p, c.text) for p, c in fresh])):
            c.score = sc[-1] if sc else 0.0
        for p in prompts:   # stable: the first of equal scores survives
            beams[p] = sorted(cands[p], key=lambda b: -b.score)[:width]
        if all(b.done for p in prompts for b in beams[p]):
            break
    out = []
    for p in prompts:
        done = [b for b in beams[p] if is_complete(b.text)] or beams[p]
        best = max(done, key=lambda b: b.score)
        out.append(_result(p, best.text, spent[p], best.score))
    return out


def dvts(llm, scorer, prompts: list[str], n: int, subtrees: int, temperature: float = 0.8, max_steps: int = 8,
         step_tokens: int = 16, max_tokens: int = 40, seed: int = 0) -> list[SearchResult]:
    """Diverse verifier tree search: `subtrees` independent width-1 beams, each expanding n // subtrees
    steps per iteration; the answer is the best-scoring final leaf. One subtree is `beam_search(width=1)`."""
    if subtrees < 1 or n < subtrees:
        raise ValueError(f"dvts needs 1 <= subtrees <= n, got subtrees={subtrees}, n={n}")
    runs = [beam_search(llm, scorer, prompts, n // subtrees, 1, temperature, max_steps, step_tokens, max_tokens,
                        seed, tree=j) for j in range(subtrees)]
    out = []
    for i, p in enumerate(prompts):
        best = max(range(subtrees), key=lambda j: (runs[j][i].score, -j))   # the first of equal leaves
        r = runs[best][i]
        out.append(SearchResult(p, r.text, sum(runs[j][i].tokens for j in range(subtrees)), r.correct, r.score))
    return out


def run_strategy(name: str, llm, prompts: list[str], n: int, scorer=None, agg: str = "last", width: int = 4,
                 temperature: float = 0.8, max_tokens: int = 40, seed: int = 0) -> list[SearchResult]:
    """One strategy by name (what `rlpt search` calls)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: one of {STRATEGIES}")
    if name in ("best_of_n", "weighted_best_of_n", "beam", "dvts") and scorer is None:
        raise ValueError(f"strategy {name!r} needs a scorer (a PRM or ORM)")
    if name == "greedy":
        return greedy(llm, prompts, max_tokens)
    if name == "majority":
        return majority(llm, prompts, n, temperature, max_tokens, seed)
    if name == "best_of_n":
        return best_of_n(llm, scorer, prompts, n, agg, temperature, max_tokens, seed)
    if name == "weighted_best_of_n":
        return weighted_best_of_n(llm, scorer, prompts, n, agg, temperature, max_tokens, seed)
    if name == "beam":
        return beam_search(llm, scorer, prompts, n, min(width, n), temperature, max_tokens=max_tokens, seed=seed)
    return dvts(llm, scorer, prompts, n, max(1, n // width), temperature, max_tokens=max_tokens, seed=seed)

