"""Lesson 02 · "K trajectories from one prompt": rlpt.engine.sampling on a real next-token distribution.

The distribution: the answer digit of `<3+4+5>` (gold 12) with P(correct digit) = 0.7 at temperature 1 and the
rest spread evenly, as in the course's mock. rlpt's processed_logp_rows applies temperature, top-k and top-p; the
answer needs two digits right, so P(correct) = p², and a group of K is degenerate with p_c^K + (1 − p_c)^K.
The K draws use the engine's seeded sampler; the log-prob recorded as old_logp is the processed one.
"""
from __future__ import annotations

import math

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "K trajectories from one prompt: temperature, top-k, top-p"
SOURCE = ["rlpt.engine.sampling:processed_logp_rows", "rlpt.engine.sampling:sample"]
NOTES = [("course", "At temperature 1, p = 0.7 per digit: P(correct) = 0.49, and a group of K = 4 is degenerate "
                    "(all right or all wrong) 12.5% of the time. Breaking: low temperature with K = 2."),
         ("fix", "The course's mock lowers accuracy with temperature by a made-up rule (p = 1 − 0.3·T); the lab "
                 "applies the real temperature to the distribution, so T = 0.5 sharpens p to 0.98 and groups go "
                 "degenerate for the opposite reason (all right)."),
         ("course", "old_logp is recorded from the distribution actually sampled (after temperature, top-k, top-p): "
                    "scoring at another temperature makes ρ ≠ 1 at step 0.")]
GOLD = (1, 2)                                      # the answer 12, one token per digit


class Knobs(BaseModel):
    k: int = Field(4, ge=1, le=16, description="K")
    temperature: float = Field(1.0, ge=0.5, le=1.5, description="temperature", json_schema_extra={"step": 0.05})
    top_k: int = Field(0, ge=0, le=10, description="top-k (0 = off)")
    top_p: float = Field(1.0, ge=0.05, le=1.0, description="top-p", json_schema_extra={"step": 0.05})
    seed: int = Field(0, ge=0, le=999, description="seed")


def compute(k: Knobs) -> dict:
    import torch

    from rlpt.engine.sampling import SamplingParams, processed_logp_rows, sample
    logits = torch.full((2, 10), math.log(0.3 / 9))                                   # (2 digits, 10)
    logits[0, GOLD[0]] = logits[1, GOLD[1]] = math.log(0.7)
    params = SamplingParams(temperature=k.temperature, top_k=k.top_k, top_p=k.top_p, seed=k.seed)
    logp = processed_logp_rows(logits, [params, params])                                 # (2, 10)
    p = float(logp[0, GOLD[0]].exp())
    pc = p * p
    rows = logp.repeat(k.k, 1)                                     # (2K, 10): digit 1, digit 2, digit 1, ...
    toks = sample(rows, [False] * (2 * k.k), [k.seed] * (2 * k.k), list(range(2 * k.k))).view(k.k, 2)
    trajs = [{"response": f"{a}{b}#", "reward": int((a, b) == GOLD), "old_logp": float(logp[0, a] + logp[1, b])}
             for a, b in toks.tolist()]
    return {"p_digit": p, "p_correct": pc, "degenerate_p": pc ** k.k + (1 - pc) ** k.k,
            "probs": logp[0].exp().tolist(), "raw": logits[0].softmax(0).tolist(), "trajs": trajs,
            "mean_reward": sum(t["reward"] for t in trajs) / k.k}


def render(r: dict) -> str:
    k = svg.kpis([("P(digit right)", f'{r["p_digit"]:.3f}'), ("P(correct)", f'{r["p_correct"]:.3f}'),
                  ("P(degenerate group)", f'{100 * r["degenerate_p"]:.1f}%'),
                  ("mean reward", f'{r["mean_reward"]:.2f}')])
    rows = [[i, t["response"], t["reward"], round(t["old_logp"], 3), round(math.exp(t["old_logp"]), 4)]
            for i, t in enumerate(r["trajs"])]
    return (k + svg.table(["i", "digits", "r", "old_logp", "prob"], rows)
            + svg.bar_chart([str(d) for d in range(10)], {"T = 1": r["raw"], "sampled from": r["probs"]}, "probability",
                            "first digit: the distribution sampled from"))
