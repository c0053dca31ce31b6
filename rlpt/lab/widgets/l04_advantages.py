"""Lesson 04 · "Advantage assignment, three rollouts": every algorithm's real `compute_advantages` on one group.

    REINFORCE A = r;  GRPO (r − mean)/(std + 1e-6);  RLOO r − mean of the others;  Dr.GRPO r − mean
"""
from __future__ import annotations

from pydantic import BaseModel, Field

from rlpt.lab import svg
from rlpt.lab.widgets._algos import advantages, population

TITLE = "Advantage assignment, three rollouts"
SOURCE = ["rlpt.algorithms.grpo:GRPO.group_advantages", "rlpt.algorithms.rloo:RLOO.group_advantages",
          "rlpt.algorithms.reinforce:REINFORCE.compute_advantages"]
NOTES = [("course", "Rewards (0, 0, 1): REINFORCE 0/0/1, Dr.GRPO −0.333/−0.333/+0.667, RLOO −0.5/−0.5/+1.0 "
                    "(1.5× the centred value: K/(K−1)). Breaking: all rewards equal → every advantage 0, the "
                    "controller skips the step."),
         ("fix", "The course's GRPO row (−0.707/−0.707/+1.414) divides by the population std (÷K); rlpt, like TRL "
                 "and verl, uses the unbiased std (÷(K−1)) and gives −0.577/−0.577/+1.155. The lab shows both.")]
ALGOS = ("reinforce", "grpo", "rloo", "drgrpo")


class Knobs(BaseModel):
    r0: float = Field(0.0, ge=0, le=1, description="r₀")
    r1: float = Field(0.0, ge=0, le=1, description="r₁")
    r2: float = Field(1.0, ge=0, le=1, description="r₂")


def compute(k: Knobs) -> dict:
    r = [k.r0, k.r1, k.r2]
    out = {name: advantages(name, r) for name in ALGOS}
    return {"rewards": r, "adv": {n: a for n, (a, _) in out.items()}, "degenerate": out["grpo"][1],
            "course_grpo": population(r)}


def render(r: dict) -> str:
    rows = [[n] + [round(a, 3) for a in adv] for n, adv in r["adv"].items()]
    rows.append(["course GRPO (÷K std)"] + [round(a, 3) for a in r["course_grpo"]])
    pos = sum(a > 0 for a in r["adv"]["grpo"])
    k = svg.kpis([("GRPO degenerate", "YES: step skipped" if r["degenerate"] else "no"),
                  ("positive advantages", f"{pos}/3"), ("GRPO A₂", f'{r["adv"]["grpo"][2]:+.3f}')])
    return (k + svg.table(["algorithm", "A₀", "A₁", "A₂"], rows)
            + svg.bar_chart(["A₀", "A₁", "A₂"], r["adv"], "advantage", "advantages per algorithm"))
