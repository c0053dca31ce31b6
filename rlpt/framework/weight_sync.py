"""Weight sync: push the trainer's fresh weights into the rollout's copy.

    every `every` train steps:  for each tensor  p_rollout.copy_(p_trainer);  rollout.version = trainer.version

In place (`copy_`), so the destination keeps its storage: anything holding those buffers (a KV
cache, a CUDA graph, a cuBLAS workspace) stays valid. Per tensor, because that is where a real
system gathers shards, casts (bf16 → fp8) and reshards. Names and shapes are checked, not zipped
blindly. With `every > 1` the rollout samples from stale weights: the PPO ratio drifts away from 1
and the clip fraction climbs (lesson 06) — that is what the knob is for. Production variants
(NCCL broadcast, shared memory, resharding) keep this interface.

What moves is a `payload` of the trainer's model: every parameter by default; under LoRA (rlpt.models.lora,
`lora.sync`) the adapters A, B only (`adapter_payload`: the rollout copy shares the frozen base, so 9.7 % of
the bytes on gpt_mini's shape) or the merged W + α/r·BA under the base's names (`merged_payload`). Each sync
records the bytes it moved (`bytes_last`, `bytes_total`).

The rollout's `version` becomes the trainer's (its number of train steps) at each sync, is stamped on every
trajectory (`Trajectory.version`) and is saved in the rollout's state_dict, so a resumed run stamps the same
versions; the trainer reads staleness from it (`staleness/mean|max`, in optimizer steps). With every = 1 it
equals the number of syncs; with every = 2 the unsynced steps are one train step (mini_batches × epochs
optimizer steps) stale, and an off-policy correction (`algorithm.offpolicy.mode`) can weigh that.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from rlpt.framework.roles import RolloutRole, TrainerRole

Payload = Callable[[torch.nn.Module], dict[str, torch.Tensor]]   # trainer model -> {rollout parameter name: tensor}


def all_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The default payload: every parameter (a tied one once, as named_parameters lists it)."""
    return dict(model.named_parameters())


def payload_bytes(named: dict[str, torch.Tensor]) -> int:
    """Bytes a payload moves: Σ numel · element size, a tensor listed under two names counted once."""
    unique = {(t.data_ptr(), t.numel(), t.dtype): t for t in named.values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


class WeightSyncer:
    def __init__(self, every: int = 1, payload: Payload | None = None):
        if every < 1:
            raise ValueError(f"sync.every must be >= 1, got {every}")
        self.every = every
        self.steps = 0
        self.syncs = 0
        self.payload = payload            # None: all_parameters, and the rollout must have exactly those names
        self.bytes_last = 0               # bytes the last sync moved
        self.bytes_total = 0

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
        named = (self.payload or all_parameters)(trainer.model)
        copy_named(rollout.model, named, partial=self.payload is not None)
        self.bytes_last = payload_bytes(named)
        self.bytes_total += self.bytes_last
        rollout.version = trainer.version
        return True

    def state_dict(self) -> dict:
        return {"steps": self.steps, "syncs": self.syncs}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.syncs = state["steps"], state["syncs"]


@torch.no_grad()
def copy_named(dst: torch.nn.Module, named: dict[str, torch.Tensor], partial: bool = False) -> None:
    """p.copy_(named[name]) for every parameter of `dst` (in place: the rollout's engine sees the new version
    counters), names and shapes checked first; a mismatch is a ValueError naming the parameter. `partial`: the
    payload names a non-empty subset of dst's parameters (the adapters), the others are left as they are."""
    params = dict(dst.named_parameters())
    if not partial and params.keys() != named.keys():
        diff = sorted(set(params) ^ set(named))[:4]
        raise ValueError(f"trainer and rollout models differ in parameter names: {diff}")
    if partial and not named:
        raise ValueError("the sync payload is empty: nothing would reach the rollout")
    if partial and not named.keys() <= params.keys():
        missing = sorted(set(named) - set(params))[:4]
        raise ValueError(f"the sync payload names tensors the rollout model lacks: {missing}")
    params = {name: params[name] for name in named}
    for name, p in params.items():
        if p.shape != named[name].shape:
            raise ValueError(f"{name}: trainer {tuple(named[name].shape)} vs rollout {tuple(p.shape)}")
        p.copy_(named[name])
