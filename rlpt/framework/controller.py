"""Controller: the seven-step loop, one line per role, timed per role.

    1 rollout.generate(env, K)  2 reference.score  3 algorithm.compute_advantages  4 collate
    5 trainer.train_step(batch, algorithm.compute_loss)  6 syncer.sync(trainer, rollout)  7 metrics

It never touches parameters, logits or rewards, and never knows which algorithm or task it runs
(a test checks this file for tensor operations). Groups the algorithm marks degenerate (all
rewards equal: zero advantage, zero gradient) are dropped before collate; when every group is
degenerate the step is skipped: no forward, no optimizer step, no sync, parameters bit-identical.
The rollout's own `stats` (its timings; `sampling/*` when an algorithm's dynamic sampling re-draws)
join the metrics.

Each role is also wrapped in a peak-memory probe (rlpt.perf.probe): `mem/<role>_gb` is the peak during it,
torch.cuda.max_memory_allocated on a GPU (`mem/cuda` = 1), else the process's peak resident set (Linux
VmHWM, reset per role; everything resident counts, interpreter and libraries included). The group and
length statistics `rlpt diagnose` reads come from here too: `groups/signal_frac` (groups with unequal
rewards, the ones that carry a gradient) and quantiles of the response lengths, `len/p10 len/p50 len/p90
len/max` (response tokens, a multi-turn answer's tool output included).

Each field is typed by its role's interface (roles.py, and `Environment`, `Algorithm`); `state_dict()`
gathers every role's state across steps in one dict, which is what a checkpoint holds beside the weights.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from rlpt.errors import LogpMismatchError  # defined without torch, for the CLI
from rlpt.framework.algorithm import Algorithm
from rlpt.framework.environment import Environment
from rlpt.framework.roles import ReferenceRole, RolloutRole, SyncerRole, TrainerRole
from rlpt.framework.signal_metrics import signal_metrics
from rlpt.framework.trajectory import collate, flatten, rollout_metrics
from rlpt.perf.probe import PeakMemory


def length_quantiles(lengths: list[int]) -> dict:
    """p10 / p50 / p90 (nearest rank) and max of the step's response lengths."""
    xs = sorted(lengths)

    def at(q: float) -> float:
        return float(xs[min(len(xs) - 1, int(q * len(xs)))])
    return {"len/p10": at(0.1), "len/p50": at(0.5), "len/p90": at(0.9), "len/max": float(xs[-1])}


@dataclass
class Controller:
    rollout: RolloutRole
    env: Environment
    reference: ReferenceRole
    algorithm: Algorithm
    trainer: TrainerRole
    syncer: SyncerRole
    k: int
    pad_id: int
    logp_tol: float | None = 1e-5       # on the mean |Δ|; None: no check (top-p/top-k sampling)
    logp_tol_max: float = 1e-3          # on the worst token
    tol_keys: tuple[str, str] = ("check.logp_tol", "check.logp_tol_max")   # the config keys they came from
    timings: dict = field(default_factory=dict)

    @contextmanager
    def timed(self, role: str):
        t0 = time.perf_counter()
        with PeakMemory() as pm:
            yield
        self.timings[f"time/{role}"] = time.perf_counter() - t0
        self.timings[f"mem/{role}_gb"] = pm.peak_bytes / 1e9
        self.timings["mem/cuda"] = float(pm.source == "cuda")

    def step(self) -> dict:
        self.timings = {}
        with self.timed("rollout"):
            groups = self.rollout.generate(self.env, self.k)                        # 1 sample + verify
        self.timings["time/verify"] = self.rollout.stats.get("time/verify", 0.0)
        self.timings["time/rollout"] -= self.timings["time/verify"]
        with self.timed("ref"):
            self.reference.score(flatten(groups), self.pad_id)                      # 2 π_ref
        self.algorithm.compute_advantages(groups)                                   # 3 advantages
        kept = [t for t in flatten(groups) if not t.degenerate]
        metrics = {**rollout_metrics(groups), **self.rollout.stats, "groups/kept": len(kept) / len(flatten(groups)),
                   **length_quantiles([len(t.response_ids) for t in flatten(groups)])}
        metrics["groups/signal_frac"] = 1.0 - metrics["groups/degenerate_frac"]
        # data/*; the env sees every group drawn, those a GroupFilter dropped too (a curriculum's p̂ needs them)
        metrics |= signal_metrics(groups) | self.env.observe(getattr(self.rollout, "drawn", None) or groups)
        if kept:
            batch = collate(kept, self.pad_id)                                      # 4 collate
            with self.timed("train"):
                metrics |= self.trainer.train_step(batch, self.algorithm.compute_loss)   # 5 train
            with self.timed("sync"):
                metrics["sync/done"] = float(self.syncer.sync(self.trainer, self.rollout))   # 6 sync
        metrics["step/skipped"] = float(not kept)
        self._check(metrics)
        return metrics | self.timings                                               # 7 metrics

    def state_dict(self) -> dict:
        """Every role's state across steps; "algorithm" only when the algorithm keeps any (REINFORCE's baseline)."""
        state = {"trainer": self.trainer.state_dict(), "rollout": self.rollout.state_dict(),
                 "env": self.env.state_dict(), "sync": self.syncer.state_dict()}
        if algorithm := self.algorithm.state_dict():
            state["algorithm"] = algorithm
        return state

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.rollout.load_state_dict(state["rollout"])
        self.env.load_state_dict(state["env"])
        self.syncer.load_state_dict(state["sync"])
        self.algorithm.load_state_dict(state.get("algorithm", {}))

    def _check(self, metrics: dict) -> None:
        mean, worst = metrics.get("check/logp_mismatch_mean"), metrics.get("check/logp_mismatch")
        if self.logp_tol is None or mean is None:
            return
        if mean > self.logp_tol or worst > self.logp_tol_max:
            raise LogpMismatchError(
                f"trainer log-probs differ from the rollout's old_logp by {mean:.3g} on average and {worst:.3g} "
                f"at worst (limits {self.tol_keys[0]}={self.logp_tol:g}, {self.tol_keys[1]}={self.logp_tol_max:g}) "
                "on a batch sampled with the trainer's current weights. The rollout and "
                "trainer disagree: look for a temperature applied on one side only, dropout left on, an "
                "off-by-one in collate, or different precision.")
