"""Lesson 06 · "Stale π_old → ratio explosion": the course's 1-D toy, with its hard gate replaced by rlpt's own
clipped surrogate. A scalar θ_T (trainer) climbs toward 4; the rollout holds θ_R, synced every `sync_every` steps;
log ρ = θ_T − θ_R. Each step the update θ_T += 0.04·(4 − θ_T) is applied only if clipped_surrogate passes a
gradient (A = +1: it stops once ρ > 1 + ε). Reward = σ(θ_T − 2), tracked by an EMA (0.95 / 0.05).
"""
from __future__ import annotations

import math

from pydantic import BaseModel, Field

from rlpt.lab import svg
from rlpt.lab.widgets import no_progress

KIND = "simulation"      # a loop of training steps, not a formula: not held to the calculators' 300 ms
TITLE = "Stale π_old → ratio explosion"
SOURCE = ["rlpt.framework.algorithm:clipped_surrogate"]
NOTES = [("course", "200 steps: sync every 1 → 0% clipped, reward EMA 0.88; every 10 → 50%, 0.86; every 20 → "
                    "88.5%, 0.58; every 40 → 95%, 0.33. Breaking: a large sync_every — the loss still looks fine "
                    "while the reward stalls."),
         ("fix", "The course's toy gates the update on ρ ∈ [0.8, 1.2] by hand and admits the hard gate "
                 "exaggerates; the lab asks the real min() surrogate whether a gradient flows (for A > 0 it stops "
                 "exactly when ρ > 1 + ε). Its 'final |log ρ|' reads 0 whenever sync_every divides 200: it syncs "
                 "on the last step; the lab shows the whole |log ρ| curve.")]


class Knobs(BaseModel):
    sync_every: int = Field(1, ge=1, le=40, description="sync_every")
    eps: float = Field(0.2, ge=0.05, le=0.5, description="ε", json_schema_extra={"step": 0.05})
    steps: int = Field(200, ge=10, le=1000, description="steps", json_schema_extra={"step": 10})


def compute(k: Knobs, progress=no_progress) -> dict:
    import torch

    from rlpt.framework.algorithm import clipped_surrogate
    theta_t = theta_r = 0.0
    ema, clipped, log_rho, rewards = 0.0, 0, [], []
    one = torch.ones(1, 1)
    for s in range(k.steps):
        progress(s / k.steps)
        new = torch.full((1, 1), theta_t, requires_grad=True)
        pg_tok, _ = clipped_surrogate(new, torch.full((1, 1), theta_r), one, one, k.eps, k.eps)
        pg_tok.sum().backward()
        if float(new.grad) != 0.0:             # the surrogate lets the update through
            theta_t += 0.04 * (4 - theta_t)
        else:
            clipped += 1
        ema = 0.95 * ema + 0.05 / (1 + math.exp(-(theta_t - 2)))
        log_rho.append((s, abs(theta_t - theta_r)))
        rewards.append((s, ema))
        if (s + 1) % k.sync_every == 0:        # weight sync: the rollout catches up
            theta_r = theta_t
    return {"frac_clipped": clipped / k.steps, "reward_ema": ema, "log_rho": log_rho, "ema_curve": rewards,
            "max_log_rho": max(v for _, v in log_rho)}


def render(r: dict) -> str:
    k = svg.kpis([("frac clipped", f'{100 * r["frac_clipped"]:.1f}%'), ("final reward EMA", f'{r["reward_ema"]:.2f}'),
                  ("max |log ρ|", f'{r["max_log_rho"]:.2f}')])
    return k + svg.line_chart({"|log ρ|": r["log_rho"], "reward EMA": r["ema_curve"]}, "step", "", "stale sync")
