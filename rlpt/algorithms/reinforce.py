"""REINFORCE: the log-derivative trick, with no baseline, no ratio and no clip.

Paper: Williams 1992, "Simple statistical gradient-following algorithms for connectionist RL".
Advantage: A_i = r_i, or r_i − b with b a running mean of earlier steps' rewards (`baseline=true`; off by default).
Loss:      −(1/(B·L)) Σ_i A_i Σ_t log π_θ(y_i,t | x, y_i,<t)  + β·KL_k3(π_θ ‖ π_ref)   (L = max_tokens, a constant)
Diff from its predecessor: none, it is the root of the lineage (lesson 09); the lesson's
"−(1/K) Σ_i R_i Σ_t logp" divided by the constant L, so one learning rate suits every algorithm.
Length bias: no per-token one (every token weighs A_i / (B·L)), but a sequence's total push grows with
|y|; with binary rewards and no baseline only correct answers move (A = 0 for a wrong one).

The baseline b is an exponential moving average of past batch means, bias-corrected like Adam's
moments (b = ema / (1 − decay^n)); it is read before this step's rewards join it, so it never
depends on y_i and the gradient stays unbiased (lesson 11). It is algorithm state, saved in every
checkpoint, so `--resume` continues bit-identically. A group whose advantages are all zero (no
baseline and all rewards 0) carries no policy gradient and is marked degenerate. On-policy as
published: with `trainer.epochs > 1` or `sync.every > 1` the data is off-policy (`ratio/abs_log_mean` shows
how far); `algorithm.offpolicy.mode=tis` weighs each token by min(π_prox/μ, C), PPO adds the ratio too.

    rlpt train algorithm.name=reinforce [algorithm.baseline=true] [key=value ...]
"""
from __future__ import annotations

import torch
from pydantic import Field

from rlpt.framework.algorithm import AggMode, Algorithm, AlgorithmConfig, masked_mean, register


def policy_gradient_loss(algo: Algorithm, batch, new_logp) -> tuple[torch.Tensor, dict]:
    """−w·A·log π per token, aggregated with the algorithm's mode, plus the KL term. Shared with RLOO.
    w = 1 unless `algorithm.offpolicy.mode` weighs the tokens (no ratio here, so no anchor either)."""
    pg_tok = -batch.advantage * new_logp                                  # (B, T-1)
    _, w, off = algo.behaviour(batch)
    if w is not None:
        pg_tok = w * pg_tok
    pg = algo.aggregate(pg_tok, batch)
    kl, kl_stats = algo.kl_term(batch, new_logp)
    with torch.no_grad():   # no ratio in the loss, but how stale the batch is still matters
        log_ratio = (new_logp - batch.old_logp).abs() * batch.mask
        stats = {"ratio/abs_log_mean": masked_mean(log_ratio, batch.mask), "ratio/abs_log_max": log_ratio.max()}
    return pg + kl, {"loss/pg": pg.detach(), "loss/kl": kl.detach(), **stats, **kl_stats, **off}


@register("reinforce")
class REINFORCE(Algorithm):
    class Config(AlgorithmConfig):
        name: str = "reinforce"
        baseline: bool = Field(False, description="subtract a running mean of earlier rewards")
        baseline_decay: float = Field(0.9, ge=0, lt=1, description="EMA decay of the running-mean baseline")

    default_agg: AggMode = "seq-mean-token-sum-norm"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.ema, self.seen = 0.0, 0          # running-mean baseline state

    @property
    def baseline_value(self) -> float:
        if not self.cfg.baseline or self.seen == 0:
            return 0.0
        return self.ema / (1.0 - self.cfg.baseline_decay ** self.seen)

    def compute_advantages(self, groups) -> None:
        b = self.baseline_value
        for g in groups:
            for t in g:
                t.advantage = t.reward - b
            degenerate = all(t.advantage == 0 for t in g)
            for t in g:
                t.degenerate = degenerate
        if self.cfg.baseline:
            rewards = [t.reward for g in groups for t in g]
            d = self.cfg.baseline_decay
            self.ema, self.seen = d * self.ema + (1 - d) * sum(rewards) / len(rewards), self.seen + 1

    def compute_loss(self, batch, new_logp):
        return policy_gradient_loss(self, batch, new_logp)

    def state_dict(self) -> dict:
        return {"ema": self.ema, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.seen = state["ema"], state["seen"]
