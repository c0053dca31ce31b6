"""DAPO: GRPO with clip-higher, dynamic sampling, a token-level loss and an overlong soft penalty.

Paper: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (ByteDance Seed).
Advantage: A_i = (r̃_i − mean(r̃)) / (std(r̃) + 1e-6), r̃_i = r_i − λ·overlong(|y_i|), std unbiased as GRPO's.
Loss:      −Σ_{i,t} min(ρ_t A_i, clip(ρ_t, 1−ε_low, 1+ε_high) A_i) / Σ_i |y_i|  + β·KL_k3 (same token mean)
Diff from GRPO: ε_high = 0.28 > ε_low = 0.2, token-mean instead of per-sequence mean, degenerate
groups re-drawn instead of wasted, and a length penalty on the reward (the four fixes of lesson 13).
Length bias: none per token within a batch; Σ|y_i| changes per batch, a length-adaptive step size.

overlong(L) = clamp((L − (L_max − buffer)) / buffer, 0, 1): 0 up to L_max − buffer tokens, rising
linearly to 1 at L_max (`overlong_max_len`, default rollout.max_tokens; `overlong_buffer`, default
20 % of it, lesson 13's L_thresh = 0.8·max_new), whether or not the response ended with EOS (the
formula, not the lesson's prose). λ = `overlong_coef` (1.0; 0 turns the penalty off).
Truncated responses keep the verifier's credit (the lenient last-integer verdict) and take the full
penalty: a truncated correct answer nets 1 − λ = 0, a truncated wrong one −λ.
Order: the dynamic-sampling filter runs first, on the raw verifier rewards (the paper keeps prompts
whose accuracy is neither 0 nor 1); the penalty is applied after, in compute_advantages. So a group
with all-equal raw rewards is dropped even if penalties would separate it, and a kept group whose
penalised rewards come out all equal is marked degenerate and dropped too.
Dynamic sampling: the rollout re-draws ⌈missing · oversample⌉ prompts per round until
prompts_per_step groups are mixed or `max_draws` rounds were made (then it trains on what it has;
`sampling/cap_hit`, `sampling/groups_drawn`). A prompt solved with probability p gives an all-equal
group with probability p^K + (1−p)^K: 0.656 at p = 0.9, K = 4 (lesson 13).

    rlpt train algorithm.name=dapo [algorithm.dynamic_sampling=false] [key=value ...]
"""
from __future__ import annotations

import torch
from pydantic import Field

from rlpt.algorithms.grpo import GRPO
from rlpt.framework.algorithm import AggMode, group_rewards, register
from rlpt.framework.rollout import GroupFilter


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment in [0, 1] (subtracted, times λ, from the reward)."""
    return ((lengths.float() - (max_len - buffer)) / buffer).clamp(0.0, 1.0)


def degenerate_fraction(p: float, K: int) -> float:
    """Probability that K Bernoulli(p) rewards are all equal: the share of groups with no signal."""
    return p ** K + (1 - p) ** K


@register("dapo")
class DAPO(GRPO):
    class Config(GRPO.Config):
        name: str = "dapo"
        clip_eps_high: float | None = Field(0.28, gt=0, description="ε_high of clip-higher (ε_low = clip_eps)")
        dynamic_sampling: bool = Field(True, description="re-draw prompts whose K rewards are all equal")
        max_draws: int = Field(4, ge=1, description="sampling rounds per step at most (the retry cap)")
        oversample: float = Field(1.0, ge=1, description="prompts per round = ⌈missing groups · oversample⌉")
        overlong_coef: float = Field(1.0, ge=0, description="λ of the overlong penalty; 0 = off")
        overlong_max_len: int = Field(0, ge=0, description="L_max; 0 = rollout.max_tokens")
        overlong_buffer: int = Field(0, ge=0, description="penalty ramp length; 0 = 20% of L_max")

        def resolve(self, group_size: int, max_tokens: int) -> None:
            super().resolve(group_size, max_tokens)
            if self.overlong_max_len == 0:
                self.overlong_max_len = max_tokens
            if self.overlong_buffer == 0:
                self.overlong_buffer = max(1, round(0.2 * self.overlong_max_len))
            if self.overlong_buffer > self.overlong_max_len:
                raise ValueError(f"config key 'algorithm.overlong_buffer': {self.overlong_buffer} must be <= "
                                 f"algorithm.overlong_max_len ({self.overlong_max_len})")

    default_agg: AggMode = "token-mean"

    @property
    def group_filter(self) -> GroupFilter | None:
        if not self.cfg.dynamic_sampling:
            return None
        return GroupFilter(self.keep_group, max_draws=self.cfg.max_draws, oversample=self.cfg.oversample)

    @staticmethod
    def keep_group(group) -> bool:
        """Mixed raw verdicts: at least two different rewards in the group."""
        return len({t.reward for t in group}) > 1

    def compute_advantages(self, groups) -> None:
        c = self.cfg
        for g in groups:
            pen = overlong_penalty(torch.tensor([len(t.response_ids) for t in g]), c.overlong_max_len,
                                   c.overlong_buffer)                                           # (K,)
            shaped = group_rewards(g) - c.overlong_coef * pen
            adv, degenerate = self.group_advantages(shaped)
            if c.dynamic_sampling and not self.keep_group(g):   # the filter's verdict stands
                adv, degenerate = torch.zeros_like(adv), True
            for t, a, s, p in zip(g, adv.tolist(), shaped.tolist(), pen.tolist()):
                t.advantage = a
                t.degenerate = degenerate
                t.info |= {"shaped_reward": s, "overlong_penalty": p}
