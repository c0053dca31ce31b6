"""Lesson 17 · "ORM rerank vs PRM rerank (toy 6-step chain)", on rlpt/search's own selection functions: the course's
toy, with real chains of thought. Each trial is a 7-operand problem from rlpt's ArithmeticTask (6 addition steps);
each of N candidates writes every step right with probability p_good (a wrong step adds 1–3 to its sum and the rest
carry it on, so the final answer is wrong iff a step is). The candidates are picked by rlpt.search.strategies'
`pick_majority`, `pick_best` and `pick_weighted`, scored by `OracleScorer` (exact prefix truth) or by it with its
labels flipped: an ORM (the pass/fail bit flipped with probability orm_flip) and a PRM (each step's label flipped
with probability prm_flip, aggregated by `aggregate`: min / prod / last).

    one sample:  P = q = p_good⁶            best-of-N with the oracle = pass@N = 1 − (1 − q)^N
    BoN-ORM:     f = q(1−ε) + (1−q)ε flagged;  P = (1 − (1−f)^N) · q(1−ε)/f + (1−f)^N · qε/(1−f)   (first wins ties)
"""
from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, Field

from rlpt.lab import svg
from rlpt.lab.widgets import no_progress

KIND = "simulation"      # a loop of trials: a background job on the page
TITLE = "ORM rerank vs PRM rerank (toy 6-step chain)"
SOURCE = ["rlpt.search.strategies:pick_best", "rlpt.search.strategies:pick_majority",
          "rlpt.search.strategies:pick_weighted", "rlpt.search.strategies:aggregate",
          "rlpt.search.scorer:OracleScorer.score", "rlpt.search.steps:true_step_labels"]
IMPORTS = ["rlpt.gpt_mini.task"]
NOTES = [("course", "Defaults (p_good 0.75, N 16, ORM flip 0.10, PRM flip 0.15): greedy 0.19 (= 0.75⁶ = 0.178), "
                    "BoN-ORM 0.65 = (1−(1−0.242)^16)·0.661, BoN-PRM 0.62."),
         ("course", "Best-of-N with a perfect verifier is pass@N: the ceiling every scorer is measured against. "
                    "A scorer no better than chance within a prompt (flip 0.5) picks a random candidate: best-of-N "
                    "falls to one sample's accuracy while majority voting, which needs no scorer, stays above it "
                    "(docs/search.md §2b: a trained PRM that ranked at chance within a prompt fell below greedy)."),
         ("fix", "The course's PRM sums its noisy step scores; rlpt aggregates a response's step scores by min, prod "
                 "or last (the prefix is the whole response), and its PRM labels are prefix truth (a step after the "
                 "first error is wrong too), so BoN-PRM differs from the course's 0.62. The course's beam column "
                 "compares unequal budgets (K = 1 at the defaults: no pruning); rlpt's beam_search needs a model, "
                 "so it is not in this widget — compare strategies at equal generated tokens (`rlpt search`).")]
STEPS = 6
MAX_WORK = 40_000        # candidates scored per request (n · trials): ~2 s here


class Knobs(BaseModel):
    p_good: float = Field(0.75, ge=0.5, le=0.95, description="p_good (per step)", json_schema_extra={"step": 0.05})
    n: int = Field(16, ge=2, le=64, description="N candidates", json_schema_extra={"step": 2})
    orm_flip: float = Field(0.10, ge=0.0, le=0.5, description="ORM flip prob", json_schema_extra={"step": 0.05})
    prm_flip: float = Field(0.15, ge=0.0, le=0.5, description="PRM flip prob per step",
                            json_schema_extra={"step": 0.05})
    agg: Literal["min", "prod", "last"] = Field("min", description="PRM aggregation")
    trials: int = Field(500, ge=50, le=2000, description="trials")
    seed: int = Field(0, ge=0, le=999, description="seed")


def limit(k: Knobs) -> str | None:
    if k.n * k.trials > MAX_WORK:
        return (f"N · trials = {k.n * k.trials} candidates to score; at most {MAX_WORK} per request "
                f"(fewer trials at N = {k.n}: ≤ {MAX_WORK // k.n})")
    return None


def chain(problem, good: list[bool], rng: random.Random) -> str:
    """A CoT response whose step k is right iff good[k]; a wrong step adds 1..3 to its sum, later steps carry it."""
    acc, steps = problem.operands[0], []
    for x, ok in zip(problem.operands[1:], good):
        s = acc + x + (0 if ok else rng.randint(1, 3))
        steps.append(f"{acc}+{x}={s}")
        acc = s
    return ",".join(steps) + "#"


class FlipScorer:
    """OracleScorer's labels, each flipped with probability `flip` (orm: only the last, the outcome bit)."""

    def __init__(self, kind: str, flip: float, rng: random.Random):
        from rlpt.search.scorer import OracleScorer
        self.oracle, self.kind, self.flip, self.rng = OracleScorer(), kind, flip, rng

    def score(self, rows):
        out = []
        for truth in self.oracle.score(rows):
            if self.kind == "orm":
                truth = truth[-1:]
            out.append([1.0 - t if self.rng.random() < self.flip else t for t in truth])
        return out


def compute(k: Knobs, progress=no_progress) -> dict:
    from rlpt.gpt_mini.task import ArithmeticTask
    from rlpt.search.scorer import OracleScorer
    from rlpt.search.strategies import Samples, pick_best, pick_majority, pick_weighted, score_samples
    rng = random.Random(k.seed)
    task = ArithmeticTask(STEPS + 1, STEPS + 1)
    oracle, orm = OracleScorer(), FlipScorer("orm", k.orm_flip, rng)
    prm = FlipScorer("prm", k.prm_flip, rng)
    names = ("one sample", "oracle BoN", "majority", "BoN-ORM", "BoN-PRM", "weighted PRM")
    wins = dict.fromkeys(names, 0)
    for t in range(k.trials):
        if t % 25 == 0:
            progress(t / k.trials)
        p = task.sample(rng)
        texts = [chain(p, [rng.random() < k.p_good for _ in range(STEPS)], rng) for _ in range(k.n)]
        s = Samples(p.prompt, texts, [len(x) for x in texts])
        prm_scores = score_samples(prm, [s])[0]
        picks = {"one sample": pick_best(s.first(1), [[1.0]]),
                 "oracle BoN": pick_best(s, score_samples(oracle, [s])[0], "last"),
                 "majority": pick_majority(s),
                 "BoN-ORM": pick_best(s, score_samples(orm, [s])[0], "last"),
                 "BoN-PRM": pick_best(s, prm_scores, k.agg),
                 "weighted PRM": pick_weighted(s, prm_scores, k.agg)}
        for name, r in picks.items():
            wins[name] += r.correct
    acc = {name: wins[name] / k.trials for name in names}
    q, e = k.p_good ** STEPS, k.orm_flip
    f = q * (1 - e) + (1 - q) * e                       # a candidate the ORM flags as a pass
    orm_closed = (1 - (1 - f) ** k.n) * q * (1 - e) / f + ((1 - f) ** k.n * q * e / (1 - f) if f < 1 else 0.0)
    return {"accuracy": acc, "greedy_closed": q, "pass_at_n_closed": 1 - (1 - q) ** k.n, "orm_closed": orm_closed,
            "orm_course": (1 - (1 - f) ** k.n) * q * (1 - e) / f, "n": k.n, "trials": k.trials}


def render(r: dict) -> str:
    a = r["accuracy"]
    k = svg.kpis([("one sample", f'{a["one sample"]:.3f} (p⁶ = {r["greedy_closed"]:.3f})'),
                  ("pass@N", f'{a["oracle BoN"]:.3f} (closed {r["pass_at_n_closed"]:.3f})'),
                  ("majority", f'{a["majority"]:.3f}'),
                  ("BoN-ORM", f'{a["BoN-ORM"]:.3f} (closed {r["orm_closed"]:.3f})'),
                  ("BoN-PRM", f'{a["BoN-PRM"]:.3f}'), ("weighted PRM", f'{a["weighted PRM"]:.3f}')])
    warn = ('<p class="warn">the PRM ranks no better than chance: best-of-N is back at one sample\'s accuracy</p>'
            if a["BoN-PRM"] <= a["one sample"] + 0.03 else "")
    return k + warn + svg.bar_chart(list(a), {"accuracy": list(a.values())}, "accuracy",
                                    f'accuracy over {r["trials"]} trials, N = {r["n"]}')
