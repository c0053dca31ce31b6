"""Off-policy corrections: how much each sampled token may count when the sampler μ is not the trainer π_prox.

Three policies per token t (lesson 25, the rollout/trainer mismatch; AReaL's decoupled PPO):
    μ       the sampler (behaviour) policy: the rollout's `old_logp`, recorded at sampling time
    π_prox  the trainer with the weights at the start of the step: one extra no-grad forward (`prox_logp`)
    π_θ     the trainer being updated
    ρ_t = π_prox/μ (the behaviour ratio),  u_t = π_θ/π_prox (the PPO ratio, clipped as usual)

They differ when the sampler's weights are stale (sync.every > 1, async rollouts: staleness) or when its
kernels differ (bf16 vs fp32, another engine). Every mode below anchors PPO's ratio at π_prox and multiplies
the per-token clipped surrogate by a stop-gradient weight w_t (`behaviour_weights`):

    J(θ) = E_{y∼μ}[ w_t · min(u_t·A_t, clip(u_t, 1−ε, 1+ε)·A_t) ]

    none          w = 1 and the anchor stays μ (no π_prox forward): today's behaviour, bit for bit
    tis           w = min(ρ, C), C = cap = 2                   truncated IS (Yao et al. 2025; slime, verl C = 2)
    icepop        w = ρ if low ≤ ρ ≤ high else 0 (0.5, 5)      masked IS (Ring-1T; OpenRLHF / NeMo-RL defaults)
    seq_mask_tis  ρ̄_i = exp(mean_t log ρ_t); the whole sequence is dropped unless low ≤ ρ̄_i ≤ high,
                  kept ones get w = min(ρ, C)                  (OpenRLHF seq-mask-tis; the Seq-MIS most argue for)
    decoupled     w = ρ, masked where ρ > high                 AReaL's (π_prox/μ)·clip-PPO(π_θ/π_prox), its
                                                               behaviour-weight cap masking the rest

A dropped token has w = 0: it adds nothing to the loss but still counts in the aggregation denominator, like
a zero-advantage token, so micro-batch losses still add up exactly. Padding (mask 0) has w = 1; an all-padding
row is kept with w = 1 (its geometric mean is empty: ρ̄ = 1), never NaN.

Diagnostics (verl's rollout_corr/*, slime's mismatch metrics, PipelineRL's ESS), over the valid tokens:
    offpolicy/kl_k3          k3 estimate of KL(μ ‖ π_prox) from tokens y ∼ μ: mean(ρ − 1 − log ρ) ≥ 0
    offpolicy/ess            (Σw)² / (N·Σw²) ∈ (0, 1]: 1 when all weights are equal (VCPO: collapse follows it)
    offpolicy/clamped_frac   share of tokens whose weight was cut to C
    offpolicy/masked_frac    share of tokens dropped (w = 0)
    offpolicy/abs_log_rho_max  the largest |log ρ|
Pure tensor functions: the same code serves the in-process controller and the Ray topologies.
"""
from __future__ import annotations

from typing import Literal

import torch

OffPolicyMode = Literal["none", "tis", "icepop", "seq_mask_tis", "decoupled"]
MODES: tuple[str, ...] = ("none", "tis", "icepop", "seq_mask_tis", "decoupled")


def ess(w: torch.Tensor, mask: torch.Tensor) -> float:
    """Effective sample size of weights w over the tokens where mask is 1: (Σw)² / Σw².
    n for n equal weights; 1 when one token carries all the weight; 0 when every weight is 0 or no token counts."""
    wm = (w * mask).double()
    sq = float((wm * wm).sum())
    return float(wm.sum()) ** 2 / sq if sq > 0 else 0.0


@torch.no_grad()
def behaviour_weights(prox_logp: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor,
                      mode: OffPolicyMode, cap: float = 2.0, low: float = 0.5, high: float = 5.0
                      ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Per-token behaviour weights (B, T-1) for `mode` (module doc), detached.

    prox_logp = log π_prox, behav_logp = log μ, mask = 1 on the tokens the policy sampled.
    Returns (w, keep_mask, metrics): w multiplies the per-token surrogate (0 on dropped tokens, 1 on padding),
    keep_mask = mask with the dropped tokens zeroed, metrics the diagnostics above (floats)."""
    if mode not in MODES:
        raise ValueError(f"unknown off-policy mode {mode!r} (algorithm.offpolicy.mode): use one of {MODES}")
    mask = mask.to(prox_logp.dtype)
    valid = mask > 0
    log_rho = (prox_logp.detach() - behav_logp.detach()) * mask      # masked before exp: padding gives ρ = 1
    rho = torch.exp(log_rho)
    ones = torch.ones_like(rho)
    clamped = torch.zeros_like(valid)
    keep = valid.clone()
    log_low, log_high = (torch.log(torch.tensor(x, dtype=log_rho.dtype)) for x in (low, high))   # bounds in log space
    inside = (log_rho >= log_low) & (log_rho <= log_high)
    if mode == "none":
        w = ones
    elif mode == "tis":
        w = rho.clamp(max=cap)
        clamped = valid & (rho > cap)
    elif mode == "icepop":
        keep = valid & inside
        w = torch.where(keep, rho, torch.zeros_like(rho))
    elif mode == "seq_mask_tis":
        log_gm = log_rho.sum(-1) / mask.sum(-1).clamp(min=1)         # (B,) log of the geometric mean ρ̄_i
        row_kept = (log_gm >= log_low) & (log_gm <= log_high)
        keep = valid & row_kept[:, None]
        w = torch.where(keep, rho.clamp(max=cap), torch.zeros_like(rho))
        clamped = keep & (rho > cap)
    else:   # decoupled
        keep = valid & (log_rho <= log_high)
        w = torch.where(keep, rho, torch.zeros_like(rho))
    w = torch.where(valid, w, ones)                                  # padding: weight 1
    n = int(valid.sum())
    nf = max(n, 1)
    kl = (rho - 1 - log_rho) * mask                                  # k3 of KL(μ ‖ π_prox), 0 on padding
    metrics = {"offpolicy/kl_k3": float(kl.sum()) / nf,
               "offpolicy/ess": ess(w, mask) / n if n else 1.0,
               "offpolicy/clamped_frac": float(clamped.sum()) / nf,
               "offpolicy/masked_frac": float((valid & ~keep).sum()) / nf,
               "offpolicy/abs_log_rho_max": float(log_rho.abs().max()) if n else 0.0}
    return w, keep.to(mask.dtype), metrics
