"""A deterministic weight lag: the rollout samples with the weights of exactly `lag` train steps ago.

    after train step v (trainer.version = v):  keep a copy of the weights W_v;  rollout ← W_{v − lag} once it exists
    the batch trained at step t was sampled with version max(t − lag, 0):  staleness = min(t, lag) train steps

This is what async RL does to a batch (the rollout runs ahead on old weights, AReaL's η, `system.max_staleness`),
without the timing: every step has the same lag, every run replays bit for bit, so an off-policy correction
(`algorithm.offpolicy.mode`) can be compared with none at one fixed staleness (bench/staleness.py). In optimizer
steps, as the trainer logs it (`staleness/mean|max`): lag × mini_batches × epochs + j, with j the optimizer step
within the train step; with one mini-batch and one epoch exactly `lag` from step `lag` on.

`sync.every` lags by 0 … every − 1 steps in a saw-tooth; this lags by the same amount on every step. The cost is
`lag` copies of the weights held on the trainer's side (a real async system holds them in the rollout workers).
The copies are in `state_dict`, so `--resume` continues with the same lagged weights.
"""
from __future__ import annotations

from collections import deque

import torch

from rlpt.framework.roles import RolloutRole, TrainerRole
from rlpt.framework.weight_sync import copy_named


class LaggedSyncer:
    """A SyncerRole (roles.py) for `sync.lag` ≥ 1: once per train step, push the trainer's weights, hand over the
    ones `lag` versions old."""

    def __init__(self, lag: int):
        if lag < 1:
            raise ValueError(f"sync.lag must be >= 1 for a lagged sync, got {lag} (0 is the plain WeightSyncer)")
        self.lag = lag
        self.steps = 0                       # train steps seen
        self.syncs = 0                       # weights handed to the rollout
        self.history: deque[tuple[int, dict[str, torch.Tensor]]] = deque()   # (version, weights), oldest first

    @torch.no_grad()
    def sync(self, trainer: TrainerRole, rollout: RolloutRole) -> bool:
        """Called once per train step (after it): keeps W_v, and copies W_{v − lag} into the rollout when held.
        Returns whether it copied (False for the first `lag` steps: the rollout keeps the start weights)."""
        self.steps += 1
        weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        self.history.append((trainer.version, weights))
        if len(self.history) <= self.lag:
            return False
        version, old = self.history.popleft()          # version = trainer.version − lag
        copy_named(rollout.model, old)
        rollout.version = version
        self.syncs += 1
        return True

    def state_dict(self) -> dict:
        return {"steps": self.steps, "syncs": self.syncs, "lag": self.lag,
                "history": [(v, dict(w)) for v, w in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("lag") != self.lag:
            raise ValueError(f"the checkpoint was written with sync.lag={state.get('lag')}, this run has "
                             f"sync.lag={self.lag}: resume with the same sync.lag")
        self.steps, self.syncs = state["steps"], state["syncs"]
        self.history = deque((v, dict(w)) for v, w in state["history"])
