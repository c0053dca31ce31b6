"""Lesson 12 · "GRPO vs RLOO advantage, K rollouts": RLOO.group_advantages against the centred GRPO advantage
(Dr.GRPO's, no /std). A_RLOO = r_i − mean_{j≠i} r_j = K/(K−1) · (r_i − mean r).
"""
from __future__ import annotations

import random

from pydantic import BaseModel, Field

from rlpt.lab import svg
from rlpt.lab.widgets._algos import advantages

TITLE = "GRPO vs RLOO advantage, K rollouts"
SOURCE = ["rlpt.algorithms.rloo:RLOO.group_advantages", "rlpt.algorithms.grpo:GRPO.group_advantages"]
NOTES = [("course", "RLOO = K/(K−1) × the centred advantage: 2 at K=2, 1.33 at K=4, 1.14 at K=8. Breaking: K=2 "
                    "doubles the scale; accuracy 0 or 1 makes every group degenerate (all zeros in both columns)."),
         ("course", "Rewards are Bernoulli(accuracy) draws; 'seed' is the course's Resample button.")]


class Knobs(BaseModel):
    k: int = Field(4, ge=2, le=10, description="K")
    accuracy: float = Field(0.5, ge=0, le=1, description="accuracy", json_schema_extra={"step": 0.05})
    seed: int = Field(0, ge=0, le=999, description="resample (seed)")


def compute(k: Knobs) -> dict:
    rng = random.Random(k.seed)
    r = [float(rng.random() < k.accuracy) for _ in range(k.k)]
    grpo, _ = advantages("drgrpo", r)           # centred, no /std: GRPO's advantage before the std
    rloo, degenerate = advantages("rloo", r)
    ratio = [b / a if abs(a) > 1e-12 else None for a, b in zip(grpo, rloo)]
    return {"rewards": r, "grpo": grpo, "rloo": rloo, "ratio": ratio, "k_over": k.k / (k.k - 1),
            "mean": sum(r) / k.k, "degenerate": degenerate}


def render(r: dict) -> str:
    k = svg.kpis([("K/(K−1)", f'{r["k_over"]:.3f}'), ("mean r", f'{r["mean"]:.2f}'),
                  ("degenerate", "YES" if r["degenerate"] else "no")])
    rows = [[i, x, round(a, 4), round(b, 4), "—" if q is None else round(q, 4)]
            for i, (x, a, b, q) in enumerate(zip(r["rewards"], r["grpo"], r["rloo"], r["ratio"]))]
    return (k + svg.table(["i", "r", "A GRPO (centred)", "A RLOO", "ratio"], rows)
            + svg.bar_chart([str(i) for i in range(len(r["rewards"]))], {"GRPO centred": r["grpo"], "RLOO": r["rloo"]},
                            "A"))
