"""Lesson 09 · "Gradient estimator noise vs K", measured on a real policy gradient: the 5-arm bandit of lesson 01
(π = softmax(θ) at a fixed θ), K sampled actions, and rlpt's REINFORCE loss differentiated by autograd gives ĝ; the
exact gradient ∇J = Σ_a π_a r_a (e_a − π) is known in closed form. The error |ĝ − ∇J| shrinks as 1/√K; RLOO's
leave-one-out baseline (same K samples) shrinks it further without bias.
"""
from __future__ import annotations

import random

from pydantic import BaseModel, Field

from rlpt.lab import svg
from rlpt.lab.widgets import no_progress

KIND = "simulation"      # a loop of training steps, not a formula: not held to the calculators' 300 ms
TITLE = "Gradient estimator noise vs K"
SOURCE = ["rlpt.algorithms.reinforce:policy_gradient_loss", "rlpt.algorithms.rloo:RLOO.group_advantages"]
NOTES = [("course", "K = 1 swings wildly in direction; averaging K estimates cuts the noise as 1/√K, and a baseline "
                    "cuts it again without adding bias: every algorithm of Part II is a variance-reduction patch."),
         ("fix", "The course's toy compares its estimate with a 'reward direction' (1, 0.4) that is not the "
                 "estimator's expectation (that is ≈(0.28, 0.11)), so its displayed error stalls at ≈0.77 instead of "
                 "going to 0. "
                 "The lab measures against the exact gradient of the bandit, so the error really falls as 1/√K.")]
REWARDS = (0.1, 0.3, 0.9, 0.4, 0.2)
THETA = (0.0, 0.5, 0.0, 0.3, -0.2)          # a policy part-way through training
KS = (1, 2, 4, 8, 16, 32)


class Knobs(BaseModel):
    k: int = Field(1, ge=1, le=32, description="K")
    trials: int = Field(50, ge=5, le=200, description="trials per K")
    seed: int = Field(0, ge=0, le=999, description="seed")


def _estimate(k: int, rng: random.Random, algo, baseline: bool):
    import torch

    from rlpt.framework.trajectory import Trajectory, collate
    theta = torch.tensor(THETA, requires_grad=True)
    logp = torch.log_softmax(theta, 0)
    probs = logp.detach().exp().tolist()
    acts = rng.choices(range(5), weights=probs, k=k)
    trajs = [Trajectory([0], [a], torch.ones(1), logp[a:a + 1].detach(), reward=REWARDS[a]) for a in acts]
    if baseline and k >= 2:
        adv, _ = algo["rloo"].group_advantages(torch.tensor([t.reward for t in trajs]))
        for t, a in zip(trajs, adv.tolist()):
            t.advantage = a
    else:
        algo["reinforce"].compute_advantages([trajs])
    batch = collate(trajs, pad_id=0)                                                       # (K, 1)
    loss, _ = algo["reinforce"].compute_loss(batch, logp[torch.tensor(acts)].view(k, 1))
    loss.backward()
    return -theta.grad                                                                     # ĝ: ascent direction


def compute(k: Knobs, progress=no_progress) -> dict:
    import torch

    import rlpt.algorithms  # noqa: F401 - registers reinforce and rloo
    from rlpt.framework.algorithm import make_algorithm
    algo = {"reinforce": make_algorithm({"name": "reinforce", "beta": 0.0, "norm_len": 1}, 1, 1),
            "rloo": make_algorithm({"name": "rloo", "beta": 0.0}, 2, 1)}
    pi = torch.softmax(torch.tensor(THETA), 0)
    r = torch.tensor(REWARDS)
    exact = pi * (r - (pi * r).sum())                         # Σ_a π_a r_a (e_a − π), per component
    rng = random.Random(k.seed)
    err = {"REINFORCE": [], "RLOO baseline": []}
    for i, kk in enumerate(KS):
        for name, base in (("REINFORCE", False), ("RLOO baseline", True)):
            e = []
            for _ in range(k.trials):
                progress(i / (len(KS) + 1))            # often: a cancelled job stops within one estimate
                e.append(float((_estimate(kk, rng, algo, base) - exact).norm()))
            err[name].append((kk, sum(e) / len(e)))
    mine = [_estimate(k.k, rng, algo, False) for _ in range(k.trials)]
    at_k = sum(float((g - exact).norm()) for g in mine) / k.trials
    return {"exact": exact.tolist(), "error": err, "error_at_k": at_k, "estimates": [g.tolist() for g in mine[:20]]}


def render(r: dict) -> str:
    rows = dict(r["error"]["REINFORCE"])
    k = svg.kpis([("mean |ĝ − ∇J| at your K", f'{r["error_at_k"]:.3f}'), ("K=1", f'{rows[1]:.3f}'),
                  ("K=16", f'{rows[16]:.3f}'), ("K=1 / K=16", f'{rows[1] / rows[16]:.2f}× (√16 = 4)')])
    return k + svg.line_chart(r["error"], "K", "mean |ĝ − ∇J|", "estimator error vs K")
