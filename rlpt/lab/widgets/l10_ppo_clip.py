"""Lesson 10 · "PPO clip table": rlpt.framework.algorithm.clipped_surrogate on the six cells (sign of A × ρ band),
with the gradient through new_logp from torch autograd (does the update flow, or does the clip stop it?).

    objective = min(ρA, clip(ρ, 1−ε, 1+ε)A);  loss per token = −objective
"""
from __future__ import annotations

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "PPO clip table"
SOURCE = ["rlpt.framework.algorithm:clipped_surrogate"]
NOTES = [("course", "ε = 0.2, ρ ∈ {0.7, 1.0, 1.4}, A = ±1: the clip kills the gradient only in the one corner per "
                    "sign where the update would push further out of the trust region (ρ=1.4, A>0 and ρ=0.7, A<0)."),
         ("course", "Breaking (an implementation bug, not a knob): `max` instead of `min`, or a clip without the "
                    "min, kills the corrective corners. Also: ρ ≡ 1 on the first epoch if old_logp came from the "
                    "same weights; the clip only ever fires on later epochs or under staleness.")]


class Knobs(BaseModel):
    eps: float = Field(0.2, ge=0.01, le=0.5, description="ε", json_schema_extra={"step": 0.01})
    rho_low: float = Field(0.7, ge=0.1, le=1.0, description="ρ low", json_schema_extra={"step": 0.05})
    rho_high: float = Field(1.4, ge=1.0, le=3.0, description="ρ high", json_schema_extra={"step": 0.05})


def compute(k: Knobs) -> dict:
    import torch

    from rlpt.framework.algorithm import clipped_surrogate
    cells = []
    for rho in (k.rho_low, 1.0, k.rho_high):
        for a in (1.0, -1.0):
            new = torch.tensor([[float(torch.log(torch.tensor(rho)))]], requires_grad=True)
            old, adv, mask = torch.zeros(1, 1), torch.tensor([[a]]), torch.ones(1, 1)
            pg_tok, stats = clipped_surrogate(new, old, adv, mask, k.eps, k.eps)
            pg_tok.sum().backward()
            s1, s2 = rho * a, min(max(rho, 1 - k.eps), 1 + k.eps) * a
            grad = float(new.grad)
            cells.append({"rho": rho, "A": a, "s1": s1, "s2": s2, "objective": -float(pg_tok.detach()), "grad": grad,
                          "flows": abs(grad) > 0, "clip_frac": float(stats["clip/frac"])})
    return {"cells": cells, "eps": k.eps,
            "curve": {f"A={a:+.0f}": _objective(a, k.eps) for a in (1.0, -1.0)}}


def _objective(a: float, eps: float) -> list[tuple[float, float]]:
    """The objective over ρ ∈ [0.1, 2.5], one clipped_surrogate call on a (1, 121) row of tokens."""
    import torch

    from rlpt.framework.algorithm import clipped_surrogate
    rho = torch.linspace(0.1, 2.5, 121).unsqueeze(0)                                  # (1, 121)
    ones = torch.ones_like(rho)
    obj = -clipped_surrogate(rho.log(), 0 * ones, a * ones, ones, eps, eps)[0]
    return list(zip(rho[0].tolist(), obj[0].tolist()))


def render(r: dict) -> str:
    rows = [[c["rho"], f'{c["A"]:+.0f}', round(c["s1"], 3), round(c["s2"], 3), round(c["objective"], 3),
             "gradient flows" if c["flows"] else "clipped: gradient zero"] for c in r["cells"]]
    zero = sum(not c["flows"] for c in r["cells"])
    k = svg.kpis([("ε", f'{r["eps"]:.2f}'), ("cells with zero gradient", f"{zero}/6")])
    return (k + svg.table(["ρ", "A", "s1 = ρA", "s2 = clip(ρ)A", "min", "verdict"], rows)
            + svg.line_chart(r["curve"], "ρ", "objective min(ρA, clip(ρ)A)", "PPO objective",
                             marks=[(1 - r["eps"], "1−ε"), (1 + r["eps"], "1+ε")]))
