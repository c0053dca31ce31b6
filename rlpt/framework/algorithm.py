"""Algorithm: the plugin interface, and the pieces every algorithm's loss is made of.

    compute_advantages(groups)           writes traj.advantage (and traj.degenerate) in place
    compute_loss(batch, new_logp)        -> (loss, metrics); gradient flows through new_logp only

    loss = agg(pg_tok · mask) + β · agg(kl_tok · mask),   kl_tok = k(new_logp, ref_logp) estimating KL(π_θ ‖ π_ref)

Every algorithm subclasses `Algorithm`, which holds the shared boilerplate (its config, its aggregation
mode, the KL term) and gives each optional hook a neutral default, so callers never probe for one:
    make_critic(policy) -> nn.Module | None  a value model (None: no critic): trained by the trainer, scored
                                            as "values" by the reference side, passed to compute_loss as values=
    group_filter: GroupFilter | None        dynamic sampling: the rollout re-draws until groups pass (None: off)
    state_dict() / load_state_dict(state)   state across steps (a running baseline), checkpointed ({}: none)
    trainer_defaults: tuple[str, ...]       `key=value` overrides its runs start from (PPO: trainer.epochs=4)
    uses_reference -> bool                  whether any term reads π_ref (β > 0): if not, no reference forward
    uses_prox -> bool                       whether π_prox is needed (algorithm.offpolicy.mode != none)
    behaviour(batch) -> (anchor, w, metrics)  the PPO anchor (μ, or π_prox) and the off-policy weight w of
                                            every token (None: no correction), rlpt.framework.offpolicy

The trainer and the rollout never know which algorithm runs: swapping GRPO for DAPO is a config
change. Algorithms register with one decorator and carry their own pydantic config, so a recipe's
`algorithm:` section is validated by the algorithm it names and errors name `algorithm.<key>`.
Registering is importing: `rlpt.algorithms` registers the bundled six, and whoever builds a run
(rlpt.train) imports it; this floor never imports the algorithms above it.

Aggregation modes (how per-token terms become one number; lesson 14):
  token-mean                Σ x·m / Σ m over the batch      every token weighs the same (DAPO)
  seq-mean-token-mean       mean_i( Σ_t x·m / |y_i| )       a token of a short answer weighs more (GRPO paper)
  seq-mean-token-sum-norm   Σ x·m / (B · L)                  L a constant (max_tokens): no length bias (Dr.GRPO)
Denominators come from the batch (`agg_tokens`, `agg_seqs`), so micro-batch losses add up exactly.
"""
from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlpt.framework.offpolicy import OffPolicyMode, behaviour_weights
from rlpt.framework.trajectory import Batch, Trajectory
from rlpt.run import Stateless

if TYPE_CHECKING:   # annotation only: the rollout honours the filter, the algorithm declares it
    from rlpt.framework.rollout import GroupFilter

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLEstimator = Literal["k1", "k2", "k3"]


class OffPolicyConfig(BaseModel):
    """`algorithm.offpolicy`: the correction for a sampler μ that is not the trainer (rlpt.framework.offpolicy)."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    mode: OffPolicyMode = Field("none", description="none | tis | icepop | seq_mask_tis | decoupled")
    cap: float = Field(2.0, gt=0, description="C of tis and seq_mask_tis: token weights min(ρ, C)")
    low: float = Field(0.5, gt=0, le=1, description="icepop / seq_mask_tis: ρ (or the sequence's ρ̄) below it drops")
    high: float = Field(5.0, ge=1, description="icepop / seq_mask_tis / decoupled: ρ (or ρ̄) above it drops")


class AlgorithmConfig(BaseModel):
    """Fields every algorithm shares; subclasses add their own."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str
    beta: float = Field(0.05, ge=0, description="weight of the KL(π_θ‖π_ref) loss term")
    kl_estimator: KLEstimator = "k3"
    loss_agg: AggMode | None = Field(None, description="None = the algorithm's own mode")
    norm_len: int = Field(0, ge=0, description="L of seq-mean-token-sum-norm; 0 = rollout.max_tokens")
    offpolicy: OffPolicyConfig = Field(default_factory=OffPolicyConfig,
                                       description="off-policy correction of the sampler/trainer mismatch")

    def resolve(self, group_size: int, max_tokens: int) -> None:
        """Fill the defaults that depend on the rollout (0 = derive it); a ValueError names the key."""
        if self.norm_len == 0:
            self.norm_len = max_tokens


class Algorithm(Stateless):
    """The base of every algorithm: the two methods to write, and the hooks' neutral defaults (module doc)."""
    name: str = ""                              # set by @register
    Config: type[AlgorithmConfig] = AlgorithmConfig   # each algorithm nests its own Config(AlgorithmConfig)
    needs_groups: bool = False                  # True when the advantage needs K ≥ 2 samples per prompt
    default_agg: AggMode = "token-mean"         # used unless the config sets loss_agg
    trainer_defaults: tuple[str, ...] = ()      # `key=value` overrides its runs want; the command line wins
    group_filter: GroupFilter | None = None     # dynamic sampling off

    def __init__(self, cfg: AlgorithmConfig):
        self.cfg = cfg

    @property
    def agg(self) -> AggMode:
        return self.cfg.loss_agg or self.default_agg

    def compute_advantages(self, groups: list[list[Trajectory]]) -> None:
        raise NotImplementedError

    def compute_loss(self, batch: Batch, new_logp: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def aggregate(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-token x (B, T-1) -> scalar, in this algorithm's aggregation mode."""
        return aggregate(x, batch, self.agg, self.cfg.norm_len)

    @property
    def uses_reference(self) -> bool:
        """Whether any term reads π_ref: the KL loss term (β > 0). No KL in the reward here. When False the
        reference skips its forward (ref_logp stays unset) and `kl_term` is 0 with no `kl/mean`."""
        return self.cfg.beta > 0

    @property
    def uses_prox(self) -> bool:
        """Whether the loss needs π_prox (`prox_logp`, one no-grad forward of the trainer before the update)."""
        return self.cfg.offpolicy.mode != "none"

    def behaviour(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """-> (anchor, w, metrics): the log-probs PPO's ratio is taken against and the per-token off-policy
        weight (module rlpt.framework.offpolicy). mode none: (old_logp, None, {}), today's loss bit for bit;
        otherwise (prox_logp, w, offpolicy/* metrics)."""
        off = self.cfg.offpolicy
        if off.mode == "none":
            return batch.old_logp, None, {}
        prox = batch.extra.get("prox_logp")
        if prox is None:
            raise ValueError(f"algorithm.offpolicy.mode={off.mode} needs π_prox on every trajectory: register the "
                             "trainer's log-probs on the reference, Reference(scorers={'prox_logp': "
                             "Reference.prox_scorer(trainer.model, temperature)}), as rlpt.train.build does")
        w, _, metrics = behaviour_weights(prox, batch.old_logp, batch.mask, off.mode, off.cap, off.low, off.high)
        return prox, w, metrics

    def kl_term(self, batch: Batch, new_logp: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """β · KL(π_θ ‖ π_ref), aggregated like the policy term, and `kl/mean` per token (nothing without π_ref)."""
        if not self.uses_reference:   # β = 0: ref_logp was never computed; the term is exactly 0
            return new_logp.new_zeros(()), {}
        kl_tok = kl_estimate(new_logp, batch.ref_logp, self.cfg.kl_estimator)     # (B, T-1)
        return self.cfg.beta * self.aggregate(kl_tok, batch), {"kl/mean": masked_mean(kl_tok.detach(), batch.mask)}

    def make_critic(self, policy: torch.nn.Module) -> torch.nn.Module | None:
        return None


ALGORITHMS: dict[str, type] = {}


def register(name: str):
    """@register("grpo") on an `Algorithm` subclass with a nested `Config(AlgorithmConfig)`."""
    def deco(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name = name
        ALGORITHMS[name] = cls
        return cls
    return deco


class AlgorithmConfigError(ValueError):
    pass


def make_algorithm(section: dict, group_size: int, max_tokens: int) -> Algorithm:
    """Build the registered algorithm `section["name"]`, validating the rest of the section.
    Only what was imported is registered: import `rlpt.algorithms` first for the bundled six."""
    name = section.get("name")
    if not isinstance(name, str) or name not in ALGORITHMS:   # a list or mapping is no name (and unhashable)
        close = difflib.get_close_matches(str(name), ALGORITHMS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise AlgorithmConfigError(f"unknown algorithm '{name}' (config key algorithm.name).{hint} "
                                   f"Registered: {sorted(ALGORITHMS)}")
    cls = ALGORITHMS[name]
    try:
        cfg = cls.Config.model_validate(section)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = "algorithm." + ".".join(str(p) for p in err["loc"]) if err["loc"] else "algorithm"
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(key, ["algorithm." + f for f in cls.Config.model_fields], n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                lines.append(f"unknown config key '{key}' for {name}.{hint}")
            else:
                msg = err["msg"].removeprefix("Value error, ")
                lines.append(f"config key '{key}': {msg} (got {err.get('input')!r})")
        raise AlgorithmConfigError("invalid algorithm config:\n  " + "\n  ".join(lines)) from None
    if cls.needs_groups and group_size < 2:
        raise AlgorithmConfigError(f"{name} needs a group baseline, so rollout.k must be >= 2 (got {group_size})")
    try:
        cfg.resolve(group_size, max_tokens)
        if cfg.loss_agg is None:   # written out, so a run's config.yaml says which mode it trained with
            cfg.loss_agg = cls.default_agg
    except ValueError as e:
        raise AlgorithmConfigError(f"invalid algorithm config:\n  {e}") from None
    return cls(cfg)


# -- shared pieces ----------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Σ x·m / Σ m, with an all-zero mask giving 0 (never NaN)."""
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def aggregate(x: torch.Tensor, batch: Batch, mode: AggMode, norm_len: int) -> torch.Tensor:
    """Per-token x (B, T-1) -> scalar, with denominators of the whole (mini-)batch (see module doc)."""
    m = batch.mask
    if mode == "token-mean":
        return (x * m).sum() / max(batch.agg_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = (x * m).sum(-1) / m.sum(-1).clamp(min=1)     # (B,)
        return per_seq.sum() / max(batch.agg_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return (x * m).sum() / (max(batch.agg_seqs, 1.0) * norm_len)
    raise ValueError(f"unknown loss aggregation mode {mode!r}")


def kl_estimate(new_logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from tokens sampled from π_θ (Schulman 2020).

    r = log π_θ − log π_ref.  k1 = r (unbiased, signed, noisy);  k2 = r²/2 (biased, ≥ 0);
    k3 = e^{−r} + r − 1 (unbiased, ≥ 0). The order matters: swapping the arguments estimates
    KL(π_ref ‖ π_θ) and silently changes what is optimised.
    """
    r = new_logp - ref_logp.detach()
    if kind == "k1":
        return r
    if kind == "k2":
        return 0.5 * r * r
    if kind == "k3":
        return torch.exp(-r) + r - 1
    raise ValueError(f"unknown KL estimator {kind!r}")


def clipped_surrogate(new_logp, old_logp, adv, mask, eps_low: float, eps_high: float,
                      weight: torch.Tensor | None = None):
    """PPO's pessimistic surrogate per token: −w·min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A), and clip stats.

    ρ = π_θ/old, `old` the anchor (μ's old_logp, or π_prox under an off-policy correction); `weight` the
    stop-gradient behaviour weight w of rlpt.framework.offpolicy (None: no weight, the plain surrogate).
    log ρ is masked before exp so padding gives ρ = 1, never overflow (lesson 04).
    """
    log_ratio = (new_logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    pg_tok = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    if weight is not None:
        pg_tok = weight.detach() * pg_tok
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {"clip/frac_low": (((ratio < 1 - eps_low) & (adv < 0)).float() * mask).sum() / n,
                 "clip/frac_high": (((ratio > 1 + eps_high) & (adv > 0)).float() * mask).sum() / n,
                 "clip/frac": (((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).float() * mask).sum() / n,
                 "ratio/abs_log_mean": (log_ratio.abs() * mask).sum() / n,
                 "ratio/abs_log_max": (log_ratio.abs() * mask).max()}
    return pg_tok, stats


def group_rewards(group: list[Trajectory]) -> torch.Tensor:
    return torch.tensor([t.reward for t in group], dtype=torch.float32)
