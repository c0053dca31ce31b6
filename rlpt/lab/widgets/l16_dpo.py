"""Lesson 16 · "DPO on 4 responses (π_ref uniform)" and "per-pair loss vs gap": rlpt.preference.dpo.dpo_loss and
ipo_loss. The policy (4 logits) is trained with rlpt's dpo_loss on every pair, weighted by the Bradley–Terry
probability of the hidden scores s = (0, 1, 2, 2.5); it converges to the closed form π*(y) ∝ π_ref(y)·exp(s_y/β).
"""
from __future__ import annotations

import math

from pydantic import BaseModel, Field

from rlpt.lab import svg
from rlpt.lab.widgets import no_progress

KIND = "simulation"      # a loop of training steps, not a formula: not held to the calculators' 300 ms
TITLE = "DPO on 4 responses, and the per-pair loss"
SOURCE = ["rlpt.preference.dpo:dpo_loss", "rlpt.preference.dpo:ipo_loss"]
NOTES = [("course", "β = 0.5: π*(D) = 0.702 and the implicit reward gap D−A → 2.5 (the true gap). Breaking: "
                    "β = 2.0 stays diffuse, π*(D) = 0.394. IPO's minimum sits at Δ = 1/(2β) = 1.0 at β = 0.5."),
         ("fix", "The course's loss widget puts β inside IPO's h; rlpt uses the paper's (Δ − 1/(2β))² with Δ "
                 "unscaled, so its minimum is at Δ = 1/(2β). The course's trainer samples noisy pairs and shows a "
                 "running average that lags; the lab descends the expected loss, so it lands on π*.")]
SCORES = (0.0, 1.0, 2.0, 2.5)
MAX_STEPS = 2000          # ~1-2 ms a step here: a request past this is refused before it runs


class Knobs(BaseModel):
    beta: float = Field(0.5, ge=0.05, le=2.0, description="β", json_schema_extra={"step": 0.05})
    steps: int = Field(300, ge=1, le=20000, description="gradient steps", json_schema_extra={"step": 50})


def limit(k: Knobs) -> str | None:
    if k.steps > MAX_STEPS:
        return (f"{k.steps} steps would take ~{k.steps / 500:.0f} s on a busy 2-core machine; the lab runs at most "
                f"{MAX_STEPS} in one request (knob 'steps')")
    return None


def compute(k: Knobs, progress=no_progress) -> dict:
    import torch

    from rlpt.preference.dpo import dpo_loss, ipo_loss
    theta = torch.zeros(4, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.1)
    w, l = zip(*[(i, j) for i in range(4) for j in range(4) if i != j])
    w, l = torch.tensor(w), torch.tensor(l)
    s = torch.tensor(SCORES)
    p_bt = torch.sigmoid(s[w] - s[l])                                    # P(w ≻ l) under the hidden scores
    ref = torch.full((4,), math.log(0.25))
    # rlpt's dpo_loss is the mean over the 12 ordered pairs; the expected loss under noisy labels weights pair i
    # by P_BT(w ≻ l). Pair i's loss reaches θ only through its own pc_i and pr_i, so scaling their gradients by
    # 12·P_i turns ∇ mean_i ℓ_i into ∇ Σ_i P_i ℓ_i exactly, with one call to the real loss per step.
    scale = len(w) * p_bt
    for step in range(k.steps):
        progress(step / k.steps)
        logp = torch.log_softmax(theta, 0)
        pc, pr = logp[w], logp[l]
        pc.register_hook(lambda g: g * scale)
        pr.register_hook(lambda g: g * scale)
        loss, _ = dpo_loss(pc, pr, ref[w], ref[l], k.beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pi = torch.softmax(theta.detach(), 0).tolist()
    closed = torch.softmax(s / k.beta, 0).tolist()
    gap = k.beta * (math.log(pi[3] / 0.25) - math.log(pi[0] / 0.25))
    h = [x / 10 for x in range(-40, 81, 2)]
    zero = torch.zeros(1)
    dpo = [float(dpo_loss(torch.tensor([x]), zero, zero, zero, k.beta)[0]) for x in h]
    ipo = [float(ipo_loss(torch.tensor([x]), zero, zero, zero, k.beta)[0]) for x in h]
    return {"pi": pi, "closed_form": closed, "gap_DA": gap, "ipo_min": h[ipo.index(min(ipo))],
            "curves": {"DPO −log σ(βΔ)": list(zip(h, dpo)), "IPO (Δ − 1/(2β))²": list(zip(h, ipo))}}


def render(r: dict) -> str:
    k = svg.kpis([("π(D)", f'{r["pi"][3]:.3f}'), ("closed form π*(D)", f'{r["closed_form"][3]:.3f}'),
                  ("implicit gap D−A", f'{r["gap_DA"]:.2f}'), ("IPO minimum at Δ", f'{r["ipo_min"]:.1f}')])
    return (k + svg.bar_chart(list("ABCD"), {"π_θ": r["pi"], "π*": r["closed_form"], "π_ref": [0.25] * 4},
                              "probability", "policy after DPO")
            + svg.line_chart(r["curves"], "Δ (log-ratio gap, unscaled)", "loss", "per-pair loss", ylim=(0, 4)))
