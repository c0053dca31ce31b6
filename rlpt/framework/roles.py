"""The roles' interfaces: what the controller and the weight syncer may call on each role, nothing more.

    rollout.generate(env, K) -> groups        reference.score(trajs, pad_id)       trainer.train_step(batch, loss_fn)
    syncer.sync(trainer, rollout) -> bool     every stateful role: state_dict() / load_state_dict(state)

Structural types (`typing.Protocol`): a role satisfies one by having these members, with no base class
to inherit, so a test double or a distributed implementation (a rollout on another machine, a sharded
trainer) drops in where the bundled class sits. The bundled classes: `Rollout` / `MultiTurnRollout`
(rollout.py, agent_loop.py), `Reference` (reference.py), `Trainer` (trainer.py), `WeightSyncer`
(weight_sync.py). The other two roles have theirs in their own files: `Environment` (environment.py,
a protocol) and `Algorithm` (algorithm.py, the base class every algorithm subclasses).
"""
from __future__ import annotations

from typing import Protocol

import torch

from rlpt.framework.environment import Environment
from rlpt.framework.trainer import LossFn
from rlpt.framework.trajectory import Batch, Trajectory


class Stateful(Protocol):
    """A role whose state outlives a step (generators, counters, optimizer moments): what a checkpoint keeps."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RolloutRole(Stateful, Protocol):
    model: torch.nn.Module   # its own copy of the policy, written only by the syncer
    version: int             # version of the weights it holds, stamped on every trajectory
    stats: dict              # the last `generate`'s timings (`time/verify`, ...) and `sampling/*` counters

    def generate(self, env: Environment, K: int) -> list[list[Trajectory]]:
        """K verified samples for each of the step's prompts: groups of trajectories, old_logp recorded."""
        ...


class ReferenceRole(Protocol):
    def score(self, trajs: list[Trajectory], pad_id: int) -> None:
        """Fill each trajectory's `ref_logp` (and any scorer's `extra[name]`) in place; frozen, no state."""
        ...


class TrainerRole(Stateful, Protocol):
    model: torch.nn.Module   # the policy being trained
    version: int             # bumps whenever its weights change

    def train_step(self, batch: Batch, loss_fn: LossFn) -> dict:
        """Every optimizer step one rollout batch gets (epochs × mini-batches); returns the metrics."""
        ...


class SyncerRole(Stateful, Protocol):
    def sync(self, trainer: TrainerRole, rollout: RolloutRole) -> bool:
        """Called once per train step; returns whether the trainer's weights reached the rollout."""
        ...
