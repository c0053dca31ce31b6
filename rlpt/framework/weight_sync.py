"""Weight sync: push the trainer's fresh weights into the rollout's copy.

    every `every` train steps:  for each tensor  p_rollout.copy_(p_trainer);  rollout.version = trainer.version

In place (`copy_`), so the destination keeps its storage: anything holding those buffers (a KV
cache, a CUDA graph, a cuBLAS workspace) stays valid. Per tensor, because that is where a real
system gathers shards, casts (bf16 → fp8) and reshards. Names and shapes are checked, not zipped
blindly. With `every > 1` the rollout samples from stale weights: the PPO ratio drifts away from 1
and the clip fraction climbs (lesson 06) — that is what the knob is for. Production variants
(NCCL broadcast, shared memory, resharding) keep this interface.

The rollout's `version` becomes the trainer's (its number of train steps) at each sync, is stamped on every
trajectory (`Trajectory.version`) and is saved in the rollout's state_dict, so a resumed run stamps the same
versions; the trainer reads staleness from it (`staleness/mean|max`, in optimizer steps). With every = 1 it
equals the number of syncs; with every = 2 the unsynced steps are one train step (mini_batches × epochs
optimizer steps) stale, and an off-policy correction (`algorithm.offpolicy.mode`) can weigh that.
"""
from __future__ import annotations

import torch

from rlpt.framework.roles import RolloutRole, TrainerRole


class WeightSyncer:
    def __init__(self, every: int = 1):
        if every < 1:
            raise ValueError(f"sync.every must be >= 1, got {every}")
        self.every = every
        self.steps = 0
        self.syncs = 0

    @staticmethod
    def copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
        copy_named(dst, dict(src.named_parameters()))

    def due(self) -> bool:
        """Counts one train step; True on every `every`-th, the steps whose weights go to the rollout."""
        self.steps += 1
        if self.steps % self.every:
            return False
        self.syncs += 1
        return True

    def sync(self, trainer: TrainerRole, rollout: RolloutRole) -> bool:
        """Called once per train step; copies on every `every`-th call. Returns whether it copied."""
        if not self.due():
            return False
        self.copy_weights(trainer.model, rollout.model)
        rollout.version = trainer.version
        return True

    def state_dict(self) -> dict:
        return {"steps": self.steps, "syncs": self.syncs}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.syncs = state["steps"], state["syncs"]


@torch.no_grad()
def copy_named(dst: torch.nn.Module, named: dict[str, torch.Tensor]) -> None:
    """p.copy_(named[name]) for every parameter of `dst` (in place: the rollout's engine sees the new version
    counters), names and shapes checked first; a mismatch is a ValueError naming the parameter."""
    params = dict(dst.named_parameters())
    if params.keys() != named.keys():
        diff = sorted(set(params) ^ set(named))[:4]
        raise ValueError(f"trainer and rollout models differ in parameter names: {diff}")
    for name, p in params.items():
        if p.shape != named[name].shape:
            raise ValueError(f"{name}: trainer {tuple(named[name].shape)} vs rollout {tuple(p.shape)}")
        p.copy_(named[name])
