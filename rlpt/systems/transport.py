"""Weight transports: the trainer's fresh weights into every rollout worker's copy, each sync verified.

    sender:    payload = transport.publish(named fp32 tensors, version)     (with digest(weights))
    receiver:  version = transport.apply(payload, model)   p.copy_(received), then digest(model) == sent digest

    digest(model) = sha256( for name in sorted(names): name ‖ fp32 bytes of the tensor )

What moves is the trainer's `payload` (rlpt.framework.weight_sync's: every parameter by default; under LoRA,
`lora.sync`, the adapters A, B only or the merged W + α/r·BA under the rollout's names, rlpt.models.lora), given
to `make_transport(..., payload=)` on both sides: the receiver then copies the named subset (`partial`) and checks
the digest over those names of its model, so a LoRA sync moves and hashes the adapters alone.

Three transports, one interface:
- `InProcess`: today's `copy_` (rlpt.framework.weight_sync), the payload is the tensors themselves.
- `ObjectStore`: `ray.put` once, every worker `ray.get`s it (Ray's shared-memory object store on one node,
  its object transfer across nodes).
- `Collective`: a `ray.util.collective` broadcast from the trainer (rank 0) to the workers, per tensor
  (gloo on CPU; NCCL on GPUs). Measured here (wave2 §1.6): per-tensor gloo beat one flat bucket on CPU, where
  concatenating costs more than the per-call latency it saves.

The receiver always lands the bytes in a scratch tensor and then `copy_`s them into the parameter, in place:
the rollout engine notices a sync through the parameters' version counters (rlpt.framework.rollout), which a
collective writing straight into `.data` would not bump. A digest mismatch is a `WeightSyncError` naming the
version and both digests: a sync that silently did not happen (TRL #5312) stops the run instead of training
on stale weights. Every payload carries the version, which the worker stamps on what it samples next.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlpt.framework.weight_sync import copy_named, payload_bytes


class WeightSyncError(RuntimeError):
    pass


def named_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters a sync moves, by name (what WeightSyncer.copy_weights copies)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def trained_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (all of gpt_mini's; a LoRA policy's adapters): what changes between two copies
    built from the same start, so what the driver pulls and a resume pushes (the frozen base is model.hf_path's)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def digest(model_or_named) -> str:
    """sha256 over the name-ordered fp32 bytes of the weights (a module, or a name -> tensor dict)."""
    named = named_weights(model_or_named) if isinstance(model_or_named, torch.nn.Module) else model_or_named
    h = hashlib.sha256()
    for name in sorted(named):
        h.update(name.encode())
        h.update(named[name].detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Payload:
    version: int
    digest: str | None      # None when verification is off
    data: object            # the transport's own: tensors, an ObjectRef, or the tensor names (collective)
    nbytes: int = 0         # bytes the sync moves to each worker (a LoRA payload: the adapters')


def check(model: torch.nn.Module, payload: Payload, where: str = "rollout worker", names=None) -> None:
    """The model's weights (those named `names`: a partial payload's; None = all) must hash to the sent digest."""
    if payload.digest is None:
        return
    got = digest(model if names is None else {n: p for n, p in model.named_parameters() if n in set(names)})
    if got != payload.digest:
        raise WeightSyncError(f"weight sync to version {payload.version} failed its check: the {where}'s weights "
                              f"hash to {got[:16]}…, the trainer sent {payload.digest[:16]}… (a tensor was lost, "
                              "reordered or cast on the way); stopping rather than sampling from stale weights")


def copy_into(model: torch.nn.Module, named: dict[str, torch.Tensor], partial: bool = False) -> None:
    """The in-process syncer's copy (rlpt.framework.weight_sync.copy_named), its errors as WeightSyncError."""
    try:
        copy_named(model, named, partial=partial)
    except ValueError as e:
        raise WeightSyncError(str(e)) from None


def copy_trained(model: torch.nn.Module, named: dict[str, torch.Tensor]) -> None:
    """copy_into of `trained_weights` from a twin: every parameter when all train, else the trained subset."""
    copy_into(model, named, partial=not all(p.requires_grad for p in model.parameters()))


class InProcess:
    """The payload is the trainer's tensors themselves; apply copies them (one process, or a test)."""
    name = "in_process"

    def __init__(self, verify: bool = True, payload: Callable | None = None):
        self.verify = verify
        self.payload = payload     # None: every parameter (names equal on both sides); else a partial payload

    def named(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What a sync of `model` moves, detached: every parameter, or the payload's tensors."""
        if self.payload is None:
            return named_weights(model)
        return {k: v.detach() for k, v in self.payload(model).items()}

    def publish(self, model: torch.nn.Module, version: int) -> Payload:
        named = self.named(model)
        return Payload(version, digest(named) if self.verify else None, named, payload_bytes(named))

    def apply(self, payload: Payload, model: torch.nn.Module) -> int:
        self.land(model, payload.data, payload)
        return payload.version

    def land(self, model: torch.nn.Module, named: dict[str, torch.Tensor], payload: Payload) -> None:
        """Copy the received tensors in place and check the digest over what was sent."""
        copy_into(model, named, partial=self.payload is not None)
        check(model, payload, names=None if self.payload is None else named.keys())


class ObjectStore(InProcess):
    """One `ray.put` of the fp32 state; each worker `ray.get`s it and copies in place."""
    name = "object_store"

    def publish(self, model: torch.nn.Module, version: int) -> Payload:
        import ray
        named = {k: v.to(torch.float32).contiguous() for k, v in self.named(model).items()}
        return Payload(version, digest(named) if self.verify else None, ray.put(named), payload_bytes(named))

    def apply(self, payload: Payload, model: torch.nn.Module) -> int:
        import ray
        # a Payload passed to an actor has its ObjectRef inside a dataclass, so Ray does not resolve it: get it here
        self.land(model, ray.get(payload.data), payload)
        return payload.version


class Collective(InProcess):
    """Per-tensor broadcast over a `ray.util.collective` group: rank 0 the trainer, ranks 1..N the workers.

    `publish` gives the version and digest, which the driver hands to the workers; then the trainer's `send` and
    every worker's `apply` enter the broadcasts together (the runner calls them in one `ray.get`). Every rank
    joins the group once with `join(world, rank)`.
    """
    name = "gloo"

    def __init__(self, verify: bool = True, group: str = "rlpt_sync", backend: str = "gloo",
                 payload: Callable | None = None):
        super().__init__(verify, payload)
        self.group, self.backend = group, backend

    def join(self, world_size: int, rank: int) -> None:
        import ray.util.collective as col
        if not col.is_group_initialized(self.group):
            col.init_collective_group(world_size, rank, backend=self.backend, group_name=self.group)

    def publish(self, model: torch.nn.Module, version: int) -> Payload:
        """The version, digest and tensor names only, sent ahead through the driver; the bytes follow in `send`."""
        named = self.named(model)
        return Payload(version, digest(named) if self.verify else None, sorted(named), payload_bytes(named))

    def send(self, model: torch.nn.Module) -> None:
        import ray.util.collective as col
        named = self.named(model)
        for name in sorted(named):
            col.broadcast(named[name].to(torch.float32).contiguous(), src_rank=0, group_name=self.group)

    @torch.no_grad()
    def receive(self, model: torch.nn.Module, names: list[str]) -> None:
        import ray.util.collective as col
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:   # before any broadcast: raising mid-way would leave the sender blocked
            raise WeightSyncError(f"the sync payload names tensors the rollout model lacks: {missing[:4]}")
        for name in sorted(names):
            buf = torch.empty(params[name].shape, dtype=torch.float32)
            col.broadcast(buf, src_rank=0, group_name=self.group)
            params[name].copy_(buf)

    def apply(self, payload: Payload, model: torch.nn.Module) -> int:
        names = payload.data if payload.data is not None else sorted(n for n, _ in model.named_parameters())
        self.receive(model, names)
        check(model, payload, names=None if self.payload is None else names)
        return payload.version


def make_transport(name: str, verify: bool = True, group: str = "rlpt_sync", payload: Callable | None = None):
    """`payload`: what a sync moves (rlpt.framework.weight_sync's; None = every parameter), the same on both sides."""
    if name == "object_store":
        return ObjectStore(verify, payload)
    if name == "gloo":
        return Collective(verify, group=group, payload=payload)
    if name == "in_process":
        return InProcess(verify, payload)
    raise ValueError(f"system.transport must be object_store or gloo, got {name!r}")
