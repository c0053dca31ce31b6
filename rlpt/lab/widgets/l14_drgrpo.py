"""Lesson 14 · "Per-token gradient contribution under three aggregations": rlpt.framework.algorithm.aggregate,
differentiated by torch autograd on two correct rollouts (A = 0.5, K = 2) of lengths |y_short| and |y_long|.

    GRPO  seq-mean-token-mean      (1/K) Σ_i (1/|y_i|) Σ_t x_it      → per token A/(K|y_i|): long answers fade
    DAPO  token-mean               Σ_i Σ_t x_it / Σ_i |y_i|           → A/(|y_s| + |y_l|) for every token
    Dr.GRPO seq-mean-token-sum-norm Σ_i Σ_t x_it / (K · norm_len)     → A/(K·norm_len), a constant
"""
from __future__ import annotations

from types import SimpleNamespace

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "Per-token gradient contribution under three aggregations"
SOURCE = ["rlpt.framework.algorithm:aggregate"]
NOTES = [("course", "Defaults |y_s| = 10, |y_l| = 200: under GRPO a long answer's token gets 5.0% of a short "
                    "answer's; DAPO and Dr.GRPO give every token the same weight (ratio 1). Breaking: |y_l| ≫ |y_s| "
                    "(10 vs 500: 2%)."),
         ("fix", "The course's table omits GRPO's 1/K (0.0500 and 0.0025) but keeps Dr.GRPO's (0.25 = A/K): "
                 "rlpt's seq-mean-token-mean gives 0.025 and 0.00125 — the ratio, 5%, is the same. rlpt's Dr.GRPO "
                 "divides by K·norm_len with norm_len = rollout.max_tokens (a constant, as in the Dr.GRPO code); "
                 "the lab sets norm_len = 1 to print the course's A/K.")]
MODES = {"GRPO": "seq-mean-token-mean", "DAPO": "token-mean", "Dr.GRPO": "seq-mean-token-sum-norm"}


class Knobs(BaseModel):
    y_short: int = Field(10, ge=2, le=50, description="|y_short|")
    y_long: int = Field(200, ge=50, le=500, description="|y_long|", json_schema_extra={"step": 10})


def compute(k: Knobs) -> dict:
    import torch

    from rlpt.framework.algorithm import aggregate
    a, t = 0.5, max(k.y_short, k.y_long)
    mask = torch.zeros(2, t)
    mask[0, :k.y_short], mask[1, :k.y_long] = 1, 1                                    # (K=2, T)
    batch = SimpleNamespace(mask=mask, agg_tokens=float(mask.sum()), agg_seqs=2.0)
    out = {}
    for name, mode in MODES.items():
        w = torch.ones(2, t, requires_grad=True)           # d loss / d w_it = the token's weight in the gradient
        aggregate(a * w, batch, mode, 1).backward()
        short, long = float(w.grad[0, 0]), float(w.grad[1, 0])
        out[name] = {"short": short, "long": long, "ratio": long / short}
    return {"modes": out, "A": a, "K": 2}


def render(r: dict) -> str:
    m = r["modes"]
    k = svg.kpis([(f"{n} long/short", f'{100 * v["ratio"]:.1f}%') for n, v in m.items()])
    rows = [[n, MODES[n], round(v["short"], 6), round(v["long"], 6), f'{100 * v["ratio"]:.1f}%'] for n, v in m.items()]
    return (k + svg.table(["algorithm", "rlpt mode", "per token, short", "per token, long", "long / short"], rows)
            + svg.bar_chart(list(m), {"short": [v["short"] for v in m.values()],
                                      "long": [v["long"] for v in m.values()]}, "per-token weight"))
