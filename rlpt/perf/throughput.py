"""The throughput equation (lessons 22a, 22b, 22c, 28): a step's time from its roles, and what to cut first.

    colocated      τ = τ_R + τ_V + τ_ref + τ_T + τ_S
    disaggregated  τ = max(τ_R + τ_V, τ_ref + τ_T) + τ_S
    fully async    τ ≈ max(τ_R + τ_V, τ_ref + τ_T, τ_S)
    useful tokens/s = B · K · L̄ · keep_rate / τ
    max of K log-normal lengths ≈ μ · exp(s·√(2 ln K) − s²/2),   s = √ln(1 + c²)   (c = σ/μ; lesson 22b)

The verifier rides in the rollout stream and the reference in the trainer's (lesson 22a's caveat). The
lessons' widgets are here as functions with their defaults, bugs included where a test pins the course's
printed number; each such place says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

TOPOLOGIES = ("colocated", "disaggregated", "async")
ROLES = ("rollout", "verify", "ref", "train", "sync", "algo")


@dataclass
class RoleTimes:
    """Seconds per step of each role; `algo` (advantages, collate) is unoptimisable glue (lesson 28)."""
    rollout: float = 0.0
    verify: float = 0.0
    ref: float = 0.0
    train: float = 0.0
    sync: float = 0.0
    algo: float = 0.0

    def step(self, topology: str = "colocated") -> float:
        gen, learn = self.rollout + self.verify, self.ref + self.train
        if topology == "colocated":
            return gen + learn + self.sync + self.algo
        if topology == "disaggregated":
            return max(gen, learn) + self.sync + self.algo
        if topology == "async":
            return max(gen, learn, self.sync) + self.algo
        from rlpt.config import ConfigError
        raise ConfigError(f"unknown topology {topology!r}: one of {', '.join(TOPOLOGIES)}")

    def shares(self) -> dict[str, float]:
        """Each role's fraction of the summed (colocated) step."""
        total = sum(getattr(self, r) for r in ROLES) or 1.0
        return {r: getattr(self, r) / total for r in ROLES}


# lesson 28's typical step (7 B, 8×H100, disaggregated), and lesson 22a's published ranges
TYPICAL_SHARES = {"rollout": 0.60, "ref": 0.10, "algo": 0.05, "train": 0.20, "sync": 0.05}
TYPICAL_RANGES = {"rollout": (0.60, 0.80), "verify": (0.01, 0.10), "ref": (0.03, 0.08), "train": (0.10, 0.26),
                  "sync": (0.02, 0.10)}


def useful_tokens_per_sec(prompts: int, k: int, mean_len: float, step_s: float, keep_rate: float = 1.0) -> float:
    """B·K·L̄·keep / τ: discarded samples cost decode time but are not in the numerator."""
    return prompts * k * mean_len * keep_rate / step_s


def balance(devices: int, rollout_tokens: float, gen_tok_s_per_device: float, train_tokens: float,
            train_tok_s_per_device: float) -> tuple[float, float]:
    """Lesson 22's balance rule: split devices so rollout_tokens / gen_rate ≈ train_tokens / train_rate.
    -> (inference devices, training devices), proportional to each side's device-seconds of work."""
    gen, train = rollout_tokens / gen_tok_s_per_device, train_tokens / train_tok_s_per_device
    return devices * gen / (gen + train), devices * train / (gen + train)


def role_widget(params_b: float = 7, k: int = 16, length: int = 1024, topology: str = "disaggregated",
                prompts: int = 64, divide: float = 4) -> RoleTimes:
    """Lesson 22a's "Per-role wall-clock model" widget. Its calibration (21 s decode, 8 s train per 1 M tokens
    at 7 B) already assumes 4 GPUs, yet its code divides by 4 again (`divide`): as written the defaults give
    τ ≈ 12.4 s; `divide=1` is the calibration taken at its word."""
    tok = prompts * k * length
    decode = 21 * (params_b / 7) * tok / 1e6
    tail = 1 + 1.8 * math.tanh(length / 2048)
    train = 8 * (params_b / 7) * tok / 1e6 / divide
    return RoleTimes(rollout=decode * tail / divide, verify=0.5 + 0.5 * prompts / 64, ref=train / 3, train=train,
                     sync=0.15 * params_b + 0.005 * params_b ** 2)


def async_clip_fraction(staleness: int) -> float:
    """Lesson 22c's widget: clip fraction ≈ 1 − exp(−Δ/20) at staleness Δ (Δ = 8 → 33 %: the freshness wall)."""
    return 1 - math.exp(-staleness / 20)


def trainer_idle(times: RoleTimes, topology: str) -> float:
    """Fraction of the step the trainer waits for rollouts (lesson 22c's widget; colocated: 0 by definition)."""
    if topology == "colocated":
        return 0.0
    return max(0.0, times.rollout - times.train) / times.step(topology)


def max_of_k(mean: float, cv: float, k: int) -> float:
    """Expected longest of K log-normal lengths with mean μ and CV c (lesson 22b's extreme-value approximation):
    μ·exp(s·√(2 ln K) − s²/2), s = √ln(1 + c²). K = 16, c = 1 → 5.0 μ: the group waits for its straggler."""
    s = math.sqrt(math.log(1 + cv * cv))
    return mean * math.exp(s * math.sqrt(2 * math.log(k)) - s * s / 2)


def straggler_tax(cv: float, k: int) -> float:
    """max/mean − 1: the decode time a group of K spends waiting beyond its average member."""
    return max_of_k(1.0, cv, k) - 1


def lognormal_params(lengths: list[float]) -> tuple[float, float]:
    """(mean, CV) of measured lengths, to feed max_of_k."""
    n = len(lengths)
    mu = sum(lengths) / n
    var = sum((x - mu) ** 2 for x in lengths) / max(n - 1, 1)
    return mu, (math.sqrt(var) / mu if mu else 0.0)


# lesson 28's "Optimization-budget allocator": (name, role, multiplier, on by default)
OPTIMISATIONS = [("prefix caching", "rollout", 0.4, True), ("continuous batching", "rollout", 0.6, True),
                 ("speculative decoding", "rollout", 0.7, False), ("FP8 rollout", "rollout", 0.7, False),
                 ("chunked CE", "train", 0.8, True), ("sequence packing", "train", 0.7, True),
                 ("FSDP + checkpointing", "train", 0.85, True),
                 ("async overlap", "sync", 0.0, False), ("sync every 5 steps", "sync", 0.2, False),
                 ("separate ref pool", "ref", 0.0, False)]


@dataclass
class Allocation:
    baseline: float
    optimised: RoleTimes
    applied: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.optimised.step("colocated")

    @property
    def speedup(self) -> float:
        return self.baseline / self.total

    def largest(self) -> tuple[str, float]:
        """The role that now takes the most time, and its share: where the next effort goes."""
        role = max(ROLES, key=lambda r: getattr(self.optimised, r))
        return role, getattr(self.optimised, role) / self.total


def allocate(times: RoleTimes, on: dict[str, bool] | None = None) -> Allocation:
    """Apply lesson 28's multipliers to a measured (or slider) split. `on` overrides the defaults by name; when
    both sync options are on, overlap wins (sync 0). The algorithm's slice is never optimised."""
    on = {name: default for name, _, _, default in OPTIMISATIONS} | (on or {})
    out = RoleTimes(**{r: getattr(times, r) for r in ROLES})
    applied = []
    for name, role, mult, _ in OPTIMISATIONS:
        if on.get(name):
            setattr(out, role, getattr(out, role) * mult)
            applied.append(name)
    return Allocation(times.step("colocated"), out, applied)


def allocator_widget(rollout: float = 60, train: float = 20, ref: float = 10, sync: float = 5,
                     on: dict[str, bool] | None = None) -> Allocation:
    """The widget's sliders are percents of a 100 s step; algo = max(0, 100 − the rest). Defaults: 43.9 s, 2.28×."""
    algo = max(0.0, 100 - rollout - train - ref - sync)
    return allocate(RoleTimes(rollout=rollout, ref=ref, train=train, sync=sync, algo=algo), on)


def gain_of_each(times: RoleTimes) -> list[tuple[str, float]]:
    """Seconds each optimisation alone would save on this split, largest first (what would pay most)."""
    base = times.step("colocated")
    out = []
    for name, *_ in OPTIMISATIONS:
        only = {n: n == name for n, *_ in OPTIMISATIONS}
        out.append((name, base - allocate(times, only).total))
    return sorted(out, key=lambda x: -x[1])
