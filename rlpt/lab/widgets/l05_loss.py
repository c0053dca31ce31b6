"""Lesson 05 · "Loss assembly (one batch, one step)": the course's two-trajectory fixture through rlpt's own
Trajectory → collate → GRPO.compute_loss (token-mean aggregation, k3 KL), with new_logp = old_logp + shift + noise.

    ρ = exp(new − old);  pg_tok = −min(ρA, clip(ρ, 1−ε, 1+ε)A);  kl_tok = k3(new, ref);  loss = mean pg + β·mean kl
"""
from __future__ import annotations

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "Loss assembly (one batch, one step)"
SOURCE = ["rlpt.algorithms.grpo:GRPO.compute_loss", "rlpt.framework.trajectory:collate",
          "rlpt.framework.algorithm:clipped_surrogate", "rlpt.framework.algorithm:kl_estimate"]
NOTES = [("course", "β = 0.05, ε = 0.2, masked tokens only (6 of 8): new = old → pg 0, mean k3 0.0077651; "
                    "new = old + 0.3 → pg 0.05320, k3 0.03361, 100% clipped; new = old − 0.3 → pg 0.02101, "
                    "k3 0.07783, 100% clipped."),
         ("course", "Breaking (the lesson's exploration): a large shift with a small ε clips every token and the PG "
                    "signal dies. A = ±0.71 is GRPO at K = 2 with rewards {1, 0} and the unbiased std.")]
TOKENS = [("a", "b", "c", "#"), ("a", "1", "#", "P")]
MASK = [[1, 1, 1, 0], [1, 1, 1, 0]]
OLD = [[-0.40, -0.10, -1.20, 0.0], [-0.50, -0.90, -0.20, 0.0]]
REF = [[-0.30, -0.20, -1.10, 0.0], [-0.30, -0.80, -0.30, 0.0]]
ADV = [0.71, -0.71]


class Knobs(BaseModel):
    eps: float = Field(0.2, ge=0.05, le=0.4, description="ε", json_schema_extra={"step": 0.01})
    beta: float = Field(0.05, ge=0, le=0.5, description="β", json_schema_extra={"step": 0.005})
    shift: float = Field(0.0, ge=-0.5, le=0.5, description="new_logp − old_logp", json_schema_extra={"step": 0.05})
    noise: float = Field(0.0, ge=0, le=0.25, description="resample ±U(noise)", json_schema_extra={"step": 0.01})
    seed: int = Field(0, ge=0, le=999, description="seed")


def compute(k: Knobs) -> dict:
    import torch

    import rlpt.algorithms  # noqa: F401 - registers grpo
    from rlpt.framework.algorithm import clipped_surrogate, kl_estimate, make_algorithm
    from rlpt.framework.trajectory import Trajectory, collate
    trajs = []
    for i in range(2):
        t = Trajectory([1], [2 + i * 4 + j for j in range(4)], torch.tensor(MASK[i], dtype=torch.float32),
                       torch.tensor(OLD[i]), advantage=ADV[i])
        t.ref_logp = torch.tensor(REF[i])
        trajs.append(t)
    batch = collate(trajs, pad_id=0)                                                     # (2, 4) after the shift
    g = torch.Generator().manual_seed(k.seed)
    jitter = (torch.rand(batch.old_logp.shape, generator=g) * 2 - 1) * k.noise
    new = (batch.old_logp + k.shift + jitter) * batch.mask
    algo = make_algorithm({"name": "grpo", "loss_agg": "token-mean", "beta": k.beta, "clip_eps": k.eps}, 2, 4)
    loss, m = algo.compute_loss(batch, new)
    pg_tok, _ = clipped_surrogate(new, batch.old_logp, batch.advantage, batch.mask, k.eps, k.eps)
    kl_tok = kl_estimate(new, batch.ref_logp) * batch.mask
    rho = torch.exp((new - batch.old_logp) * batch.mask)
    rows = [[i, TOKENS[i][j], MASK[i][j], OLD[i][j], REF[i][j], round(float(new[i, j]), 4), ADV[i],
             round(float(rho[i, j]), 4), round(float(pg_tok[i, j] * batch.mask[i, j]), 5),
             round(float(kl_tok[i, j]), 5)]
            for i in range(2) for j in range(4)]
    return {"loss": float(loss), "pg": float(m["loss/pg"]), "kl": float(m["kl/mean"]), "kl_loss": float(m["loss/kl"]),
            "clip_frac": float(m["clip/frac"]), "rows": rows}


def render(r: dict) -> str:
    k = svg.kpis([("pg_loss", f'{r["pg"]:.5f}'), ("β·KL", f'{r["kl_loss"]:.6f}'), ("mean k3", f'{r["kl"]:.5f}'),
                  ("total", f'{r["loss"]:.5f}'), ("frac clipped", f'{100 * r["clip_frac"]:.0f}%')])
    labels = [f"{row[0]}:{row[1]}" for row in r["rows"]]
    return (k + svg.table(["traj", "tok", "mask", "old", "ref", "new", "A", "ρ", "pg_tok", "kl_tok"], r["rows"])
            + svg.bar_chart(labels, {"pg_tok": [row[8] for row in r["rows"]], "kl_tok": [row[9] for row in r["rows"]]},
                            "per token", "per-token terms"))
