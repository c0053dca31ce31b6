"""Lesson 11 · "GRPO advantages on a group of K=4": rlpt.algorithms.grpo.GRPO.group_advantages.

    A_i = (r_i − mean_j r_j) / (std_j r_j + 1e-6), std unbiased (ddof 1); std < 1e-8 → degenerate, A = 0
"""
from __future__ import annotations

from pydantic import BaseModel, Field

from rlpt.lab import svg
from rlpt.lab.widgets._algos import advantages, population

TITLE = "GRPO advantages on a group of K=4"
SOURCE = ["rlpt.algorithms.grpo:GRPO.group_advantages"]
NOTES = [("course", "Breaking: all rewards equal → degenerate group, zero gradient, the step is skipped. "
                    "A single outlier [1,0,0,0] dominates the group."),
         ("fix", "The course widget divides by the population std: [1,0,1,0] → ±1.000 and [1,0,0,0] → "
                 "+1.732/−0.577. rlpt uses the unbiased std, as TRL and verl do (shared/DESIGN.md): ±0.866 and "
                 "+1.5/−0.5. The lab shows the course's number beside rlpt's.")]


class Knobs(BaseModel):
    r0: int = Field(1, ge=0, le=1, description="r₀")
    r1: int = Field(0, ge=0, le=1, description="r₁")
    r2: int = Field(1, ge=0, le=1, description="r₂")
    r3: int = Field(0, ge=0, le=1, description="r₃")


def compute(k: Knobs) -> dict:
    r = [k.r0, k.r1, k.r2, k.r3]
    adv, degenerate = advantages("grpo", r)
    m = sum(r) / 4
    sd = (sum((x - m) ** 2 for x in r) / 3) ** 0.5
    return {"rewards": r, "mean": m, "std": sd, "adv": adv, "degenerate": degenerate, "course": population(r)}


def render(r: dict) -> str:
    def effect(a):
        return "push up" if a > 0.05 else "push down" if a < -0.05 else "~no signal"
    k = svg.kpis([("mean", f'{r["mean"]:.3f}'), ("std (ddof 1)", f'{r["std"]:.3f}'),
                  ("degenerate", "YES (skip step)" if r["degenerate"] else "no"), ("A₀", f'{r["adv"][0]:+.3f}')])
    rows = [[i, x, round(x - r["mean"], 3), round(a, 3), round(c, 3), effect(a)]
            for i, (x, a, c) in enumerate(zip(r["rewards"], r["adv"], r["course"]))]
    return (k + svg.table(["i", "r", "r − mean", "A (rlpt)", "A (course, ÷K std)", "effect"], rows)
            + svg.bar_chart([f"y{i}" for i in range(4)], {"rlpt": r["adv"], "course": r["course"]}, "A"))
