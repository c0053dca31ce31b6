"""Lesson 01 · "Toy policy: 5 actions, 1 best": the minimal loop sample → score → update, with rlpt's REINFORCE
doing the update. Each step samples one action a ~ π = softmax(θ), scores it with the true reward of its arm, and
trains θ through rlpt's own path: Trajectory → REINFORCE.compute_advantages → collate → compute_loss → backward.
The gradient step θ ← θ − η∇loss is then exactly the lesson's θ_i += η·r·(1[i=a] − π_i) (minus a baseline if on).
"""
from __future__ import annotations

import random

from pydantic import BaseModel, Field

from rlpt.lab import svg
from rlpt.lab.widgets import no_progress

KIND = "simulation"      # a loop of training steps, not a formula: not held to the calculators' 300 ms
TITLE = "Toy policy: 5 actions, 1 best"
SOURCE = ["rlpt.algorithms.reinforce:REINFORCE.compute_advantages", "rlpt.algorithms.reinforce:policy_gradient_loss"]
NOTES = [("course", "True rewards A–E = 0.1, 0.3, 0.9, 0.4, 0.2 (C is best), θ starts at 0. η = 0.4: after 200 steps "
                    "π(C) ≈ 0.98 and no run ends on a wrong arm; breaking: η = 2.0 — variance kicks the policy around "
                    "and about 10% of runs lock onto a wrong arm."),
         ("course", "Every sampled action is pushed up (all rewards are positive), just by different amounts; the "
                    "baseline (rlpt's REINFORCE `baseline: true`, a running mean) makes below-average actions go "
                    "down.")]
REWARDS = (0.1, 0.3, 0.9, 0.4, 0.2)
ARMS = "ABCDE"


class Knobs(BaseModel):
    eta: float = Field(0.4, ge=0.01, le=2.0, description="step size η", json_schema_extra={"step": 0.01})
    steps: int = Field(200, ge=1, le=500, description="steps")
    seed: int = Field(0, ge=0, le=999, description="seed")
    baseline: bool = Field(False, description="running-mean baseline")


def compute(k: Knobs, progress=no_progress) -> dict:
    import torch

    import rlpt.algorithms  # noqa: F401 - registers reinforce
    from rlpt.framework.algorithm import make_algorithm
    from rlpt.framework.trajectory import Trajectory, collate
    algo = make_algorithm({"name": "reinforce", "beta": 0.0, "norm_len": 1, "baseline": k.baseline}, 1, 1)
    theta = torch.zeros(5, requires_grad=True)
    rng = random.Random(k.seed)
    ema, curve, pc = None, [], []
    for s in range(k.steps):
        progress(s / k.steps)
        logp = torch.log_softmax(theta, 0)
        u, a = rng.random(), 0
        for p in logp.detach().exp().tolist():                  # inverse-CDF draw from π
            u -= p
            if u < 0:
                break
            a += 1
        a = min(a, 4)
        r = REWARDS[a]                                          # the verifier: the arm's true reward
        t = Trajectory([0], [a], torch.ones(1), logp[a:a + 1].detach(), reward=r)
        algo.compute_advantages([[t]])
        batch = collate([t], pad_id=0)                          # (1, 1): the action is the one response token
        new_logp = logp[a].view(1, 1)
        loss, _ = algo.compute_loss(batch, new_logp)
        theta.grad = None
        loss.backward()
        with torch.no_grad():
            theta -= k.eta * theta.grad
        ema = r if ema is None else 0.9 * ema + 0.1 * r
        curve.append((s + 1, ema))
        pc.append((s + 1, float(torch.softmax(theta.detach(), 0)[2])))
    pi = torch.softmax(theta.detach(), 0).tolist()
    return {"pi": pi, "argmax": ARMS[max(range(5), key=pi.__getitem__)], "pi_c": pi[2], "last_action": ARMS[a],
            "last_reward": r, "reward_ema": ema, "ema_curve": curve, "pi_c_curve": pc}


def render(r: dict) -> str:
    k = svg.kpis([("π(C)", f'{r["pi_c"]:.3f}'), ("argmax π", r["argmax"]), ("last action", r["last_action"]),
                  ("reward EMA", f'{r["reward_ema"]:.3f}')])
    return (k + svg.bar_chart(list(ARMS), {"π": r["pi"], "true reward": list(REWARDS)}, "", "policy vs reward")
            + svg.line_chart({"π(C)": r["pi_c_curve"], "reward EMA": r["ema_curve"]}, "step", "", "learning",
                             ylim=(0, 1)))
