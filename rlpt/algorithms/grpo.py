"""GRPO: PPO without a critic; the baseline is the mean reward of K samples of the same prompt.

Paper: Shao et al. 2024, "DeepSeekMath" (and DeepSeek-R1, 2025).
Advantage: A_i = (r_i − mean(r)) / (std(r) + 1e-6), std unbiased (ddof = 1, as TRL and verl),
           the same A for every token of y_i.
Loss:      −(1/B) Σ_i (1/|y_i|) Σ_t min(ρ_t A_i, clip(ρ_t, 1−ε, 1+ε) A_i)  + β·KL_k3(π_θ ‖ π_ref)
Diff from PPO: the value head and GAE are gone; the group mean is the baseline, divided by the group std.
Length bias: the per-sequence 1/|y_i| (seq-mean-token-mean) makes each token of a short answer weigh
more: a wrong long answer is punished less per token, so wrong answers drift longer (Dr.GRPO, lesson 14).
Degenerate groups (all rewards equal, std < 1e-8) get A = 0 and `degenerate = True`; the
controller drops them (no gradient signal, and they would dilute the token mean).

    rlpt train algorithm.name=grpo [key=value ...]     # or: rlpt train recipes/grpo_arith.yaml
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from rlpt.framework.algorithm import AggMode, Algorithm, AlgorithmConfig, clipped_surrogate, group_rewards, register


@register("grpo")
class GRPO(Algorithm):
    needs_groups = True

    class Config(AlgorithmConfig):
        name: str = "grpo"
        clip_eps: float = Field(0.2, gt=0, description="ε of the clipped surrogate")
        clip_eps_high: float | None = Field(None, gt=0, description="upper ε if asymmetric (None = clip_eps)")
        std_eps: float = Field(1e-6, gt=0)
        scale_by_std: bool = True

        @model_validator(mode="after")
        def _clip(self):
            if self.clip_eps_high is not None and self.clip_eps_high < self.clip_eps:
                raise ValueError(f"algorithm.clip_eps_high ({self.clip_eps_high}) must be >= "
                                 f"algorithm.clip_eps ({self.clip_eps})")
            return self

        def resolve(self, group_size: int, max_tokens: int) -> None:
            super().resolve(group_size, max_tokens)
            if self.clip_eps_high is None:   # symmetric: written out so config.yaml shows the ε it trained with
                self.clip_eps_high = self.clip_eps

    default_agg: AggMode = "seq-mean-token-mean"

    def group_advantages(self, r: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(K,) rewards -> (K,) advantages, degenerate flag."""
        if len(r) < 2:
            raise ValueError(f"{self.name} needs K >= 2 samples per prompt for its group baseline, got {len(r)}")
        std = r.std()   # unbiased, ddof = 1
        if std < 1e-8:
            return torch.zeros_like(r), True
        centred = r - r.mean()
        return (centred / (std + self.cfg.std_eps) if self.cfg.scale_by_std else centred), False

    def compute_advantages(self, groups) -> None:
        for g in groups:
            adv, degenerate = self.group_advantages(group_rewards(g))
            for t, a in zip(g, adv.tolist()):
                t.advantage = a
                t.degenerate = degenerate

    def compute_loss(self, batch, new_logp):
        eps_high = self.cfg.clip_eps_high or self.cfg.clip_eps
        anchor, w, off = self.behaviour(batch)   # μ's old_logp and no weight, unless algorithm.offpolicy.mode
        pg_tok, stats = clipped_surrogate(new_logp, anchor, batch.advantage, batch.mask,
                                          self.cfg.clip_eps, eps_high, weight=w)
        pg = self.aggregate(pg_tok, batch)
        kl, kl_stats = self.kl_term(batch, new_logp)
        return pg + kl, {"loss/pg": pg.detach(), "loss/kl": kl.detach(), **stats, **kl_stats, **off}
