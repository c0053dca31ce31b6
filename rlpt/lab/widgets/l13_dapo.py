"""Lesson 13 · DAPO's quantities, computed by rlpt.algorithms.dapo: the share of degenerate groups that dynamic
sampling refills (p^K + (1−p)^K), the overlong soft penalty, and clip-higher's asymmetric range.

    overlong penalty = clamp((|y| − (L_max − buffer)) / buffer, 0, 1)
"""
from __future__ import annotations

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "DAPO: degenerate groups, overlong penalty, clip-higher"
SOURCE = ["rlpt.algorithms.dapo:degenerate_fraction", "rlpt.algorithms.dapo:overlong_penalty",
          "rlpt.framework.algorithm:clipped_surrogate"]
NOTES = [("fix", "The course's 'DAPO ablation' widget is a scripted curve (a sigmoid climb with hand-set drags per "
                 "fix), not a computation, so the lab does not reproduce it. It shows what rlpt computes instead; "
                 "the training ablation is `rlpt compare --algos grpo,dapo`."),
         ("course", "ε_low / ε_high = 0.20 / 0.28. Breaking: p near 0 or 1 with small K — most groups are degenerate "
                    "(p = 0.9, K = 4: 66% of groups carry no gradient).")]


class Knobs(BaseModel):
    p: float = Field(0.5, ge=0, le=1, description="pass rate p", json_schema_extra={"step": 0.01})
    k: int = Field(4, ge=2, le=64, description="K")
    max_len: int = Field(1024, ge=16, le=8192, description="L_max", json_schema_extra={"step": 16})
    buffer: int = Field(256, ge=1, le=4096, description="overlong buffer", json_schema_extra={"step": 16})
    eps_high: float = Field(0.28, ge=0.2, le=0.5, description="ε_high", json_schema_extra={"step": 0.01})


def limit(k: Knobs) -> str | None:
    if k.buffer > k.max_len:
        return f"knob 'buffer' ({k.buffer}) must be <= knob 'max_len' ({k.max_len})"
    return None


def compute(k: Knobs) -> dict:
    import torch

    from rlpt.algorithms.dapo import degenerate_fraction, overlong_penalty
    from rlpt.framework.algorithm import clipped_surrogate
    lengths = torch.arange(0, k.max_len + 1, max(1, k.max_len // 128))
    pen = overlong_penalty(lengths, k.max_len, k.buffer)
    rho = torch.tensor([[1.25]])                      # a token the update wants to boost, A > 0
    one = torch.ones(1, 1)
    sym = -float(clipped_surrogate(rho.log(), 0 * one, one, one, 0.2, 0.2)[0])
    asym = -float(clipped_surrogate(rho.log(), 0 * one, one, one, 0.2, k.eps_high)[0])
    return {"degenerate": degenerate_fraction(k.p, k.k),
            "by_p": [(q / 50, degenerate_fraction(q / 50, k.k)) for q in range(51)],
            "penalty": list(zip(lengths.tolist(), pen.tolist())), "obj_sym": sym, "obj_high": asym,
            "eps_high": k.eps_high}


def render(r: dict) -> str:
    k = svg.kpis([("degenerate groups", f'{100 * r["degenerate"]:.1f}%'),
                  ("objective at ρ=1.25, A=+1 (ε 0.2 / ε_high)", f'{r["obj_sym"]:.2f} / {r["obj_high"]:.2f}')])
    return (k + svg.line_chart({"degenerate fraction": r["by_p"]}, "pass rate p", "fraction", "degenerate groups")
            + svg.line_chart({"overlong penalty": r["penalty"]}, "response length", "penalty", "overlong penalty"))
