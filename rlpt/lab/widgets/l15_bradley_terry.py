"""Lesson 15 · "Bradley–Terry reward model on 4 responses": four learned scores trained with rlpt's bt_loss on
pairs a simulated human labels with P(i ≻ j) = σ(s_i − s_j), hidden scores s = (0, 1, 2, 2.5). Plain SGD on the
scores: the gradient of −log σ(r_w − r_l) moves r_w up and r_l down by η·σ(−Δ).
"""
from __future__ import annotations

import math
import random

from pydantic import BaseModel, Field

from rlpt.lab import svg
from rlpt.lab.widgets import no_progress

KIND = "simulation"      # a loop of training steps, not a formula: not held to the calculators' 300 ms
TITLE = "Bradley–Terry reward model on 4 responses"
SOURCE = ["rlpt.preference.reward_model:bt_loss"]
NOTES = [("course", "η = 0.3: the cumulative agreement with the true order reaches ≈0.90 at 50 pairs and ≈0.95 at "
                    "500; η = 0.05 ends in the full order A<B<C<D 97% of the time. Breaking: η = 1.0 — constant-LR "
                    "noise keeps swapping the close pair C/D (gap 0.5): the full order holds only ≈40% of the time."),
         ("course", "Scores are shown shifted to the true mean: a BT model is only defined up to a constant.")]
SCORES = (0.0, 1.0, 2.0, 2.5)


class Knobs(BaseModel):
    eta: float = Field(0.3, ge=0.01, le=1.0, description="η", json_schema_extra={"step": 0.01})
    steps: int = Field(50, ge=1, le=2000, description="pairs seen", json_schema_extra={"step": 10})
    seed: int = Field(0, ge=0, le=999, description="seed")


def compute(k: Knobs, progress=no_progress) -> dict:
    import torch

    from rlpt.preference.reward_model import bt_loss
    r = torch.zeros(4, requires_grad=True)
    rng = random.Random(k.seed)
    agree, curve, loss = 0, [], 0.0
    for s in range(k.steps):
        progress(s / k.steps)
        i, j = rng.sample(range(4), 2)
        if rng.random() >= 1 / (1 + math.exp(-(SCORES[i] - SCORES[j]))):   # the human prefers j
            i, j = j, i
        agree += (r[i] > r[j]).item() == (SCORES[i] > SCORES[j])
        loss_t, _ = bt_loss(r[i:i + 1], r[j:j + 1])
        r.grad = None
        loss_t.backward()
        with torch.no_grad():
            r -= k.eta * r.grad
        loss = float(loss_t.detach())
        curve.append((s + 1, agree / (s + 1)))
    learned = r.detach()
    shown = (learned - learned.mean() + sum(SCORES) / 4).tolist()
    return {"scores": shown, "agreement": agree / k.steps, "ordered": shown == sorted(shown), "last_loss": loss,
            "curve": curve}


def render(r: dict) -> str:
    k = svg.kpis([("cumulative agreement", f'{100 * r["agreement"]:.0f}%'),
                  ("full order A<B<C<D", "yes" if r["ordered"] else "no"), ("last loss", f'{r["last_loss"]:.3f}')])
    return (k + svg.bar_chart(list("ABCD"), {"learned": r["scores"], "true": list(SCORES)}, "score", "scores")
            + svg.line_chart({"agreement": r["curve"]}, "pairs seen", "agreement", "agreement", ylim=(0, 1)))
