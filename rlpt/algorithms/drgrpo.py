"""Dr.GRPO: GRPO done right — no /std and no /|y_i|, so neither easy prompts nor lengths are favoured.

Paper: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" ("GRPO Done Right").
Advantage: A_i = r_i − mean(r), same A for every token of y_i.
Loss:      −(1/(B·L)) Σ_{i,t} min(ρ_t A_i, clip(ρ_t, 1−ε, 1+ε) A_i)  + β·KL_k3 (same divisor), L = max_tokens
Diff from GRPO: `scale_by_std=false` (bias A: a lone failure on an easy prompt no longer outweighs
a 50/50 prompt) and the constant divisor B·L replaces Σ_t/|y_i| (bias B); clip, KL, K unchanged.
Length bias: none: every token of every answer weighs A_i / (B·L), short or long, right or wrong.

Lesson 14 divides by K; the paper's code divides by a constant generation budget, which
is what `norm_len` (default rollout.max_tokens) is: a constant either way, so the direction is the
same and only the learning rate scale differs (norm_len=1 gives the lesson's A/K per token). DAPO,
its sibling, divides by Σ|y_i| instead, which varies per batch. Giving up /std makes the update
scale with the reward scale ({0,1} → {0,100} is a 100× step).

    rlpt train algorithm.name=drgrpo [key=value ...]
"""
from __future__ import annotations

from pydantic import Field

from rlpt.algorithms.grpo import GRPO
from rlpt.framework.algorithm import AggMode, register


@register("drgrpo")
class DrGRPO(GRPO):
    class Config(GRPO.Config):
        name: str = "drgrpo"
        scale_by_std: bool = Field(False, description="divide by the group std (GRPO's bias A); off")

    default_agg: AggMode = "seq-mean-token-sum-norm"
