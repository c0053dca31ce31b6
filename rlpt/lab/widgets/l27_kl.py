"""Lesson 27 (and 03's KL anchor) · the KL estimators k1 / k2 / k3 of rlpt.framework.algorithm.kl_estimate, on
tokens sampled from π_θ, against the exact KL(π_θ ‖ π_ref) of two categorical distributions over 8 tokens.

    r = log π_θ(y) − log π_ref(y), y ~ π_θ:  k1 = r,  k2 = r²/2,  k3 = e^{−r} + r − 1;  exact = Σ π_θ log(π_θ/π_ref)
"""
from __future__ import annotations

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "KL estimators k1 / k2 / k3"
SOURCE = ["rlpt.framework.algorithm:kl_estimate"]
NOTES = [("course", "k1 is unbiased but signed and noisy, k2 is non-negative but biased, k3 is non-negative and "
                    "unbiased: the production choice and rlpt's default. Breaking: a large drift makes k2's bias "
                    "grow, and with few samples k1 can come out negative."),
         ("course", "The order matters: kl_estimate(new_logp, ref_logp) estimates KL(π_θ ‖ π_ref); swapping the "
                    "arguments estimates the reverse KL and silently changes what is optimised.")]
REF_LOGITS = (2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5)    # π_ref over 8 tokens
DRIFT = (-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25)         # the direction π_θ moves in, times `drift`


class Knobs(BaseModel):
    drift: float = Field(1.0, ge=0, le=3, description="drift of π_θ from π_ref", json_schema_extra={"step": 0.05})
    samples: int = Field(64, ge=1, le=100000, description="tokens sampled")
    seed: int = Field(0, ge=0, le=999, description="seed")


def compute(k: Knobs) -> dict:
    import torch

    from rlpt.framework.algorithm import kl_estimate
    ref = torch.log_softmax(torch.tensor(REF_LOGITS), 0)
    new = torch.log_softmax(torch.tensor(REF_LOGITS) + k.drift * torch.tensor(DRIFT), 0)
    exact = float((new.exp() * (new - ref)).sum())
    g = torch.Generator().manual_seed(k.seed)
    y = torch.multinomial(new.exp(), k.samples, replacement=True, generator=g)          # (N,) tokens from π_θ
    out = {"exact": exact, "samples": k.samples}
    for kind in ("k1", "k2", "k3"):
        est = kl_estimate(new[y], ref[y], kind)                                         # (N,) per token
        expected = float((new.exp() * kl_estimate(new, ref, kind)).sum())               # E over π_θ, exactly
        out[kind] = {"mean": float(est.mean()), "std": float(est.std()) if k.samples > 1 else 0.0,
                     "min": float(est.min()), "bias": expected - exact}
    out["by_drift"] = {kind: [(d / 10, _bias(d / 10, kind)) for d in range(0, 31)] for kind in ("k1", "k2", "k3")}
    return out


def _bias(drift: float, kind: str) -> float:
    """E_{π_θ}[k] − KL at this drift, exactly (a sum over the 8 tokens)."""
    import torch

    from rlpt.framework.algorithm import kl_estimate
    ref = torch.log_softmax(torch.tensor(REF_LOGITS), 0)
    new = torch.log_softmax(torch.tensor(REF_LOGITS) + drift * torch.tensor(DRIFT), 0)
    p = new.exp()
    return float((p * kl_estimate(new, ref, kind)).sum() - (p * (new - ref)).sum())


def render(r: dict) -> str:
    k = svg.kpis([("exact KL", f'{r["exact"]:.4f}')]
                 + [(f"{kind} mean", f'{r[kind]["mean"]:.4f}') for kind in ("k1", "k2", "k3")])
    rows = [[kind, round(r[kind]["mean"], 5), round(r[kind]["std"], 5), round(r[kind]["min"], 5),
             round(r[kind]["bias"], 5)] for kind in ("k1", "k2", "k3")]
    return (k + svg.table(["estimator", f'mean of {r["samples"]}', "std per token", "min per token",
                           "bias (exact)"], rows)
            + svg.line_chart(r["by_drift"], "drift", "E[k] − KL", "bias of each estimator"))
