"""RLOO: REINFORCE with a leave-one-out group baseline; no std, no ratio, no clip.

Paper: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for RLHF" (Cohere);
Kool et al. 2019 for the estimator.
Advantage: A_i = r_i − (1/(K−1)) Σ_{j≠i} r_j = K/(K−1) · (r_i − mean(r)), same A for every token of y_i.
Loss:      −(1/(B·L)) Σ_i A_i Σ_t log π_θ(y_i,t | …)  + β·KL_k3(π_θ ‖ π_ref)        (L = max_tokens, a constant)
Diff from GRPO: the baseline leaves r_i out (so it never depends on y_i: unbiased at any K ≥ 2),
no /std, and REINFORCE's ratio-free loss instead of the clipped surrogate (as published).
Length bias: none per token (constant divisor B·L, as Dr.GRPO); a sequence's total push grows with |y|.

RLOO's advantage is GRPO's centred advantage (before /std) times K/(K−1): 2 at K = 2, 4/3 at K = 4,
8/7 at K = 8 — a learning-rate factor only when GRPO also drops its /std and /|y| (lesson 12).
With no ratio it is on-policy: keep `trainer.epochs=1` and `sync.every=1` (lesson 12's traps);
`ratio/abs_log_mean` shows how stale a batch was. All-equal groups have A = 0 and are dropped.

    rlpt train algorithm.name=rloo [key=value ...]
"""
from __future__ import annotations

import torch

from rlpt.algorithms.grpo import GRPO
from rlpt.algorithms.reinforce import policy_gradient_loss
from rlpt.framework.algorithm import AggMode, AlgorithmConfig, register


@register("rloo")
class RLOO(GRPO):
    class Config(AlgorithmConfig):
        name: str = "rloo"

    default_agg: AggMode = "seq-mean-token-sum-norm"

    def group_advantages(self, r: torch.Tensor) -> tuple[torch.Tensor, bool]:
        K = len(r)
        if K < 2:
            raise ValueError(f"{self.name} needs K >= 2 samples per prompt for its leave-one-out baseline, got {K}")
        if bool((r == r[0]).all()):
            return torch.zeros_like(r), True
        others_mean = (r.sum() - r) / (K - 1)                             # (K,) mean of the other K−1
        return r - others_mean, False

    def compute_loss(self, batch, new_logp):
        return policy_gradient_loss(self, batch, new_logp)
