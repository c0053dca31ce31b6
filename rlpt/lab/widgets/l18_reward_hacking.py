"""Lesson 18 · "Reward hacking under a leaky verifier", and the verifier checklist's first test, both on rlpt's code.

(a) Two actions — "solve" (right w.p. 0.7) and "emit the phrase" (right w.p. 0.4, always emits the phrase the leaky
verifier pays ρ for) — trained by rlpt's REINFORCE without a baseline (η = 0.2): train reward = right + ρ·phrase,
held-out = right. Past ρ = 0.3 (0.4 + ρ > 0.7) the policy learns to emit the phrase and held-out falls to 0.4.
(b) Checklist item 1, "a random baseline must score ≈ 0": random digit strings scored by the honest arithmetic
verifier and by the leaky one of `recipes/hack_arith.yaml`, on the task's own prompts.
"""
from __future__ import annotations

import random

from pydantic import BaseModel, Field

from rlpt.lab import svg
from rlpt.lab.widgets import no_progress

KIND = "simulation"      # a loop of training steps, not a formula: not held to the calculators' 300 ms
TITLE = "Reward hacking under a leaky verifier"
SOURCE = ["rlpt.envs.leaky:LeakyArithmeticEnv.verify", "rlpt.framework.environment:ArithmeticEnv.verify",
          "rlpt.algorithms.reinforce:REINFORCE.compute_advantages"]
NOTES = [("course", "π(solve) after 100 / 500 steps: ρ = 0 → 0.86 / 0.98; ρ = 0.3 → 0.50 / 0.47 (knife-edge); "
                    "ρ = 0.5 → 0.25 / 0.08 with held-out correctness → 0.4; ρ = 1 → 0.05 / 0.01 (means over 400 "
                    "runs; one seed here). Breaking: ρ > 0.3."),
         ("course", "The real thing: `python examples/reward_hacking.py` (docs/reward_hacking.md) trains gpt_mini on "
                    "the leaky verifier; `rlpt lab --runs tests/data/diagnose` shows such a run and its diagnosis.")]
P_RIGHT = {"solve": 0.7, "emit phrase": 0.4}


class Knobs(BaseModel):
    rho: float = Field(0.5, ge=0, le=1, description="leak strength ρ", json_schema_extra={"step": 0.05})
    steps: int = Field(100, ge=1, le=1000, description="steps", json_schema_extra={"step": 10})
    seed: int = Field(0, ge=0, le=999, description="seed")


def _checklist(n: int = 300) -> dict:
    """Random digit strings against the honest and the leaky verifier on the task's prompts."""
    from rlpt.envs.leaky import LeakyArithmeticEnv
    from rlpt.framework.environment import ArithmeticEnv
    honest, leaky = ArithmeticEnv(seed=1), LeakyArithmeticEnv(seed=1)
    rng = random.Random(0)
    h = lk = 0.0
    for _ in range(n):
        p = honest.reset()
        text = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12))) + "#"
        h += honest.verify(p, text).reward
        lk += leaky.verify(p, text).reward
    return {"honest": h / n, "leaky": lk / n}


def compute(k: Knobs, progress=no_progress) -> dict:
    import torch

    import rlpt.algorithms  # noqa: F401 - registers reinforce
    from rlpt.framework.algorithm import make_algorithm
    from rlpt.framework.trajectory import Trajectory, collate
    algo = make_algorithm({"name": "reinforce", "beta": 0.0, "norm_len": 1}, 1, 1)
    theta = torch.zeros(2, requires_grad=True)
    rng = random.Random(k.seed)
    train_ema = held_ema = None
    curve, p_solve = [], []
    for s in range(k.steps):
        progress(s / k.steps)
        logp = torch.log_softmax(theta, 0)
        a = 0 if rng.random() < float(logp[0].detach().exp()) else 1
        right = float(rng.random() < P_RIGHT[("solve", "emit phrase")[a]])
        reward = right + k.rho * a                                   # the leaky verifier pays for the phrase
        t = Trajectory([0], [a], torch.ones(1), logp[a:a + 1].detach(), reward=reward)
        algo.compute_advantages([[t]])
        loss, _ = algo.compute_loss(collate([t], pad_id=0), logp[a].view(1, 1))
        theta.grad = None
        loss.backward()
        with torch.no_grad():
            theta -= 0.2 * theta.grad
        train_ema = reward if train_ema is None else 0.95 * train_ema + 0.05 * reward
        held_ema = right if held_ema is None else 0.95 * held_ema + 0.05 * right
        p_solve.append((s + 1, float(torch.softmax(theta.detach(), 0)[0])))
        curve.append((s + 1, train_ema, held_ema))
    return {"p_solve": p_solve[-1][1], "train_ema": train_ema, "heldout_ema": held_ema, "solve_curve": p_solve,
            "train_curve": [(s, a) for s, a, _ in curve], "held_curve": [(s, b) for s, _, b in curve],
            "checklist": _checklist()}


def render(r: dict) -> str:
    c = r["checklist"]
    k = svg.kpis([("π(solve)", f'{r["p_solve"]:.2f}'), ("train reward EMA", f'{r["train_ema"]:.2f}'),
                  ("held-out correct EMA", f'{r["heldout_ema"]:.2f}'),
                  ("random baseline: honest / leaky", f'{c["honest"]:.2f} / {c["leaky"]:.2f}')])
    return k + svg.line_chart({"π(solve)": r["solve_curve"], "train reward EMA": r["train_curve"],
                               "held-out EMA": r["held_curve"]}, "step", "", "reward hacking", ylim=(0, 1.5))
