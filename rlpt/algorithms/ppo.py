"""PPO: REINFORCE with a learned baseline V_φ(s_t), per-token GAE advantages and a clipped ratio.

Paper: Schulman et al. 2017, "Proximal Policy Optimization Algorithms"; GAE: Schulman et al. 2016.
Advantage: A_t = Σ_k (γλ)^k δ_{t+k},  δ_t = r_t + γ V_old(s_{t+1}) − V_old(s_t);  r_t = R at the last token, else 0
           (a process-reward env, rlpt.envs.prm, moves part of R onto step delimiters: info["step_rewards"]).
KL in the reward (`kl_in_reward: true`, InstructGPT, Ouyang et al. 2022 eq. 2; Stiennon et al. 2020):
           r_t = −β (log π_old − log π_ref)(y_t) + [t = last]·R, the k1 log-ratio at each sampled token, and no
           β·KL loss term: the anchor then reaches the critic and the advantages instead of the gradient directly.
Loss:      token-mean[ −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t) ] + c_v · token-mean[ (V_φ(s_t) − R_t)² ] + β·KL_k3
Diff from REINFORCE: a critic replaces the constant baseline, the importance ratio ρ and its clip
allow several epochs per batch (`trainer.epochs`, 4 in its runs: `trainer_defaults`), advantages are per token.
Length bias: token-mean over the batch gives every token the same weight; the divisor Σ|y_i| changes
from batch to batch (a length-adaptive step size, as DAPO's).

The critic (rlpt.framework.critic) is a scalar head on the final hidden state: `value_head=separate`
(default; a copy of the policy trunk, the usual RLHF layout, ≈ 2× trainable memory) or `shared`
(on the policy's own trunk; the value loss then also trains the policy's trunk). V_old is recorded
by the reference side before any update, R_t = A_t + V_old(s_t) are the value targets, and the
advantage never uses the fresh values (lesson 10). With γ = λ = 1 (the defaults, lesson 10's
Monte-Carlo choice) A_t = R − V_old(s_t): V learns P(prefix ends correct); λ = 0.95 trades bias for
variance. GAE runs over the tokens the policy sampled (mask 1): tool output in between is part of
the environment's transition. Advantages are whitened over the batch (`whiten`, the "batch-norm"
of lesson 14's table; verl and TRL do the same). Optional PPO2 value clipping: `value_clip=0.2`.
No group baseline, so K = 1 works and no group is ever degenerate.

    rlpt train algorithm.name=ppo [algorithm.value_head=shared] [algorithm.lam=0.95] [key=value ...]
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rlpt.framework.algorithm import (
    AggMode,
    Algorithm,
    AlgorithmConfig,
    aggregate,
    clipped_surrogate,
    kl_estimate,
    masked_mean,
    register,
)
from rlpt.framework.critic import Critic


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) rewards and V(s_t) along one trajectory (terminal after the last) -> advantages (N,), returns (N,)."""
    r, v = rewards.tolist(), values.tolist()
    adv, running = [0.0] * len(v), 0.0
    for t in reversed(range(len(v))):
        delta = r[t] + gamma * (v[t + 1] if t + 1 < len(v) else 0.0) - v[t]
        running = delta + gamma * lam * running
        adv[t] = running
    adv = torch.tensor(adv, dtype=values.dtype)
    return adv, adv + values


@register("ppo")
class PPO(Algorithm):
    class Config(AlgorithmConfig):
        name: str = "ppo"
        clip_eps: float = Field(0.2, gt=0, description="ε of the clipped surrogate")
        gamma: float = Field(1.0, ge=0, le=1, description="discount per token")
        lam: float = Field(1.0, ge=0, le=1, description="GAE λ: 1 = Monte-Carlo returns, 0 = TD(0)")
        value_coef: float = Field(0.5, ge=0, description="c_v, weight of the value loss")
        value_clip: float | None = Field(None, gt=0, description="clip V around V_old by ±this; None = off")
        value_head: Literal["separate", "shared"] = "separate"
        whiten: bool = Field(True, description="normalise advantages to mean 0, std 1 over the batch")
        kl_in_reward: bool = Field(False, description="put −β·(log π_old − log π_ref) into each token's reward "
                                   "(InstructGPT) instead of β·KL into the loss")

        def resolve(self, group_size: int, max_tokens: int) -> None:
            super().resolve(group_size, max_tokens)
            if self.kl_in_reward and self.beta == 0:
                raise ValueError("config key 'algorithm.kl_in_reward': true with algorithm.beta=0 puts nothing in "
                                 "the reward; set algorithm.beta > 0 (e.g. 0.05) or kl_in_reward: false")

    default_agg: AggMode = "token-mean"
    trainer_defaults = ("trainer.epochs=4",)   # several epochs per batch: what the ratio and clip are for

    def make_critic(self, policy: torch.nn.Module) -> Critic:
        return Critic(policy, shared=self.cfg.value_head == "shared")

    def compute_advantages(self, groups) -> None:
        trajs = [t for g in groups for t in g]
        for t in trajs:
            if "values" not in t.extra:
                raise ValueError("ppo needs V_old on every trajectory: attach its critic to the reference "
                                 "(Reference(scorers={'values': critic}), as rlpt.train.build does)")
            if self.cfg.kl_in_reward and t.ref_logp is None:
                raise ValueError("ppo with kl_in_reward needs ref_logp on every trajectory: score the batch with "
                                 "the reference (Reference(..., ref_logp=True)) before compute_advantages")
            policy = t.response_mask.nonzero().squeeze(-1)              # positions the policy chose
            adv, ret = torch.zeros(len(t.response_ids)), torch.zeros(len(t.response_ids))
            if len(policy):
                dense = torch.zeros(len(t.response_ids))                # a process-reward env's per-step terms
                for pos, x in t.info.get("step_rewards", ()):           # at step delimiters (lesson 17)
                    dense[pos] += x
                r = dense[policy]
                r[-1] += t.reward - r.sum()                             # the rest of R at the last token
                if self.cfg.kl_in_reward:                               # r_t −= β (log π_old − log π_ref)(y_t)
                    kl = t.old_logp[policy] - t.ref_logp[policy]
                    r = r - self.cfg.beta * kl
                    t.info["shaped_reward"] = float(r.sum())             # logged as reward/shaped_mean
                adv[policy], ret[policy] = gae(r, t.extra["values"][policy], self.cfg.gamma, self.cfg.lam)
            t.advantage, t.extra["returns"] = adv, ret
            t.degenerate = False
        if self.cfg.whiten:
            a = torch.cat([t.advantage[t.response_mask > 0] for t in trajs])
            mean, std = a.mean(), (a.std() if len(a) > 1 else torch.tensor(0.0))
            for t in trajs:
                t.advantage = (t.advantage - mean) / (std + 1e-8) * t.response_mask

    def compute_loss(self, batch, new_logp, values=None):
        if values is None:
            raise ValueError("ppo's loss needs the critic's values: build the trainer with "
                             "critic=algorithm.make_critic(policy)")
        eps = self.cfg.clip_eps
        anchor, w, off = self.behaviour(batch)   # μ's old_logp and no weight, unless algorithm.offpolicy.mode
        pg_tok, stats = clipped_surrogate(new_logp, anchor, batch.advantage, batch.mask, eps, eps, weight=w)
        pg = self.aggregate(pg_tok, batch)
        v_loss, v_stats = self.value_loss(batch, values)
        kl, kl_stats = self.kl_term(batch, new_logp)
        v_term = self.cfg.value_coef * v_loss
        return pg + v_term + kl, {"loss/pg": pg.detach(), "loss/value": v_term.detach(), "loss/kl": kl.detach(),
                                  **stats, **v_stats, **kl_stats, **off}

    def kl_term(self, batch, new_logp) -> tuple[torch.Tensor, dict]:
        """With the KL in the reward there is no loss term; kl/mean is still logged (on the fresh log-probs)."""
        if not self.cfg.kl_in_reward:
            return super().kl_term(batch, new_logp)
        kl_tok = kl_estimate(new_logp.detach(), batch.ref_logp, self.cfg.kl_estimator)   # (B, T-1)
        return new_logp.new_zeros(()), {"kl/mean": masked_mean(kl_tok, batch.mask)}

    def value_loss(self, batch, values) -> tuple[torch.Tensor, dict]:
        """token-mean (V − R)², or with value_clip the pessimistic max against V_old + clip(V − V_old)."""
        ret, old = batch.extra["returns"], batch.extra["values"]
        v_tok = (values - ret) ** 2                                      # (B, T-1)
        stats = {"value/mean": masked_mean(values.detach(), batch.mask)}
        if self.cfg.value_clip is not None:
            c = self.cfg.value_clip
            clipped = old + (values - old).clamp(-c, c)
            v_clip_tok = (clipped - ret) ** 2
            stats["value/clip_frac"] = masked_mean((v_clip_tok > v_tok).float(), batch.mask)
            v_tok = torch.max(v_tok, v_clip_tok)
        return aggregate(v_tok, batch, "token-mean", self.cfg.norm_len), stats
