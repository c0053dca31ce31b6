"""The roles as Ray actors, built in each actor from the same TrainJob the in-process path uses.

    RolloutWorker  rollout + env              generate(n) -> groups (old_logp, reward, weights version stamped)
    TrainerWorker  reference + algorithm      step(groups) -> metrics: the in-process Controller's own step,
                   + trainer (+ critic)       fed the groups instead of sampling them

Each actor calls `build(job, init)` (rlpt.train.build, handed in by rlpt.train: floor 5 may not import floor 6)
under the same torch.manual_seed the in-process run sets, and keeps the roles it plays. The trainer actor keeps
the whole Controller and swaps two roles: its rollout becomes a `Feed` that returns the groups the rollout
workers sent, its syncer a `DeferredSyncer` that counts like WeightSyncer but leaves the copying to the runner's
transport. So a disaggregated step runs exactly the in-process step's code, and with one rollout worker (which
keeps the job's seed) gives the same metrics (tests/test_systems_ray.py). Worker r > 0 builds with
run.seed + r, so the workers draw different prompts and tokens.

The classes are plain; `actor_classes()` wraps them with `ray.remote` when a Ray topology starts. Threads per
actor: run.threads, or 1 (on a small machine the actors contend for the same cores).
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable

import torch

from rlpt.framework.trajectory import Trajectory
from rlpt.framework.weight_sync import WeightSyncer
from rlpt.systems.ddp import RankGroup, ShardedReference, data_parallel, open_store
from rlpt.systems.partial import PartialRollout
from rlpt.systems.transport import Payload, copy_trained, digest, make_transport, trained_weights


def require_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("system.topology other than colocated runs on Ray, which is not installed: "
                          "pip install 'rlpt[ray]' (or run with system.topology=colocated)") from None
    return ray


def sync_payload(ctl):
    """What a sync moves, as the in-process syncer `build` made would (its `payload`: None = every parameter; under
    LoRA the adapters or the merged weights, lora.sync): both ends of a transport take it."""
    return getattr(ctl.syncer, "payload", None)


def _seeded_build(build: Callable, job, init, seed: int, threads: int):
    torch.set_num_threads(threads)
    if seed != job.run.seed:
        job = job.model_copy(update={"run": job.run.model_copy(update={"seed": seed})})
    torch.manual_seed(seed)   # what run_train sets before build: the critic's init and any global draw match
    return build(job, init)


class RolloutWorker:
    """Samples and verifies groups with its own copy of the policy, written only by `apply` (a weight sync)."""

    def __init__(self, build: Callable, job, init, rank: int, transport: str, verify: bool, threads: int = 1,
                 group: str = "rlpt_sync"):
        ctl, _ = _seeded_build(build, job, init, job.run.seed + rank, threads)
        # only the rollout (and env) stay: the worker's trainer, reference and critic are freed with `ctl` (an HF
        # policy is loaded from model.hf_path here, never pickled; under LoRA the rollout copy keeps the one base)
        self.rank, self.rollout, self.env, self.k = rank, ctl.rollout, ctl.env, ctl.k
        self.transport = make_transport(transport, verify, group, sync_payload(ctl))
        self.syncs = 0                 # weight syncs received (the rollout stamps its version, the trainer's)
        self.slow: tuple[float, float, random.Random] | None = None
        self.crash_in = 0              # fault injection: see crash_on_generate
        self.partial: PartialRollout | None = None   # the chunk in progress (system.partial_rollouts)
        self._chunk_t0 = 0.0
        self.segment_pause = 0.0       # test hook: see slow_segments

    def rebuild(self, *args) -> None:
        """Build the roles again from a (new) job, in this same process: reuse an actor across runs."""
        self.__init__(*args)

    def slow_verify(self, seconds: float, jitter: float = 0.0, seed: int = 0) -> None:
        """Inject latency after each generate (a judge or sandbox stand-in, or the async test's random delays):
        sleeps seconds + U(0, jitter), counted in time/verify."""
        self.slow = (seconds, jitter, random.Random(seed + self.rank))

    def slow_segments(self, seconds: float) -> None:
        """Inject latency after each unfinished segment of a partial chunk (tests: a long-tail chunk still running
        when the trainer finishes a step, so its sync lands between two segments whatever the machine's speed)."""
        self.segment_pause = seconds

    def crash_on_generate(self, calls: int) -> None:
        """Fault injection (tests): the `calls`-th generate from now kills this actor's process mid-step."""
        self.crash_in = calls

    def generate(self, n_groups: int) -> dict:
        t0 = time.time()
        self.crash_in -= 1
        if self.crash_in == 0:
            os._exit(1)
        self.rollout.prompts_per_step = n_groups
        groups = self.rollout.generate(self.env, self.k)
        stats = self._slow_verify(dict(self.rollout.stats))
        return {"groups": groups, "stats": stats, "version": self.rollout.version, "rank": self.rank,
                "t0": t0, "t1": time.time()}

    def _slow_verify(self, stats: dict) -> dict:
        """The injected verifier latency of `slow_verify` (a judge or sandbox standing in), counted as verify time."""
        if self.slow is not None:
            seconds, jitter, rng = self.slow
            pause = seconds + rng.uniform(0.0, jitter)
            time.sleep(pause)
            stats["time/verify"] = stats.get("time/verify", 0.0) + pause
        return stats

    def generate_partial(self, n_groups: int, segment_tokens: int) -> dict:
        """One segment of a chunk (rlpt.systems.partial): n_groups > 0 starts one. -> {"done": False} while its
        sequences are unfinished (a sync queued now lands before the next segment), then what `generate`
        returns, its version the chunk's oldest token's."""
        if self.partial is None:
            model = self.rollout.model
            max_seq_len = getattr(getattr(model, "cfg", None), "max_seq_len", None) or 1 << 30
            self.partial = PartialRollout(self.rollout, self.env, self.k, segment_tokens, max_seq_len)
        if n_groups:
            self._chunk_t0 = time.time()
            self.partial.start(n_groups)
        groups = self.partial.advance()
        if groups is None:
            time.sleep(self.segment_pause)
            return {"done": False, "version": self.rollout.version, "rank": self.rank}
        stats = self._slow_verify(dict(self.partial.stats))
        version = min(t.version for g in groups for t in g)
        return {"done": True, "groups": groups, "stats": stats, "version": version, "rank": self.rank,
                "t0": self._chunk_t0, "t1": time.time()}

    def join(self, world_size: int, rank: int) -> None:
        self.transport.join(world_size, rank)

    def apply(self, payload: Payload) -> dict:
        t0 = time.time()
        self.rollout.version = self.transport.apply(payload, self.rollout.model)
        self.syncs += 1
        return {"version": self.rollout.version, "digest": payload.digest, "t0": t0, "t1": time.time()}

    def digest(self) -> str:
        return digest(self.rollout.model)

    def state_dict(self) -> dict:
        return {"rollout": self.rollout.state_dict(), "env": self.env.state_dict(), "syncs": self.syncs}

    def load_state_dict(self, state: dict) -> None:
        self.rollout.load_state_dict(state["rollout"])
        self.env.load_state_dict(state["env"])
        self.syncs = state.get("syncs", self.rollout.version)


class Feed:
    """The trainer actor's rollout role: hands the Controller the groups the rollout workers sampled."""

    def __init__(self, model: torch.nn.Module):
        self.model = model     # the trainer actor's unused rollout copy (the Controller's syncer never writes it)
        self.version = 0
        self.stats: dict = {}
        self.groups: list = []

    def generate(self, env, K: int) -> list[list[Trajectory]]:
        return self.groups


class DeferredSyncer(WeightSyncer):
    """WeightSyncer's counting (sync every `every` train steps, same state) without the copy: `sync` says whether
    this step's weights are due at the rollout workers, and the runner moves them with its transport."""

    def sync(self, trainer, rollout) -> bool:
        return self.due()


class TrainerWorker:
    """Reference + algorithm + trainer (+ critic): the Controller's step on groups sampled elsewhere."""

    def __init__(self, build: Callable, job, init, transport: str, verify: bool, threads: int = 1,
                 group: str = "rlpt_sync"):
        ctl, _ = _seeded_build(build, job, init, job.run.seed, threads)
        self.has_group_filter = ctl.rollout.group_filter is not None
        ctl.rollout = Feed(ctl.rollout.model)
        payload = sync_payload(ctl)
        ctl.syncer = DeferredSyncer(job.sync.every, payload)
        self.ctl = ctl
        self.transport = make_transport(transport, verify, group, payload)

    def rebuild(self, *args) -> None:
        self.__init__(*args)

    def info(self) -> dict:
        return {"group_filter": self.has_group_filter, "version": self.ctl.trainer.version}

    def step(self, groups: list[list[Trajectory]], stats: dict) -> dict:
        t0, v0 = time.time(), self.ctl.trainer.version
        self.ctl.rollout.groups, self.ctl.rollout.stats = groups, stats
        metrics = self.ctl.step()
        return {"metrics": metrics, "version_before": v0, "version": self.ctl.trainer.version,
                "t0": t0, "t1": time.time()}

    def join(self, world_size: int, rank: int) -> None:
        self.transport.join(world_size, rank)

    def ddp_open(self) -> tuple[str, int]:
        """Rank 0 of the data-parallel trainers (rlpt.systems.ddp): the rendezvous, on a free port."""
        import ray
        host = ray.util.get_node_ip_address()
        self._store = open_store(host)
        return host, self._store.port

    def ddp_join(self, host: str, port: int, rank: int, world: int) -> str:
        """Become rank `rank` of `world` data-parallel trainers (all join at once); -> the digest of the weights."""
        backend = "nccl" if next(self.ctl.trainer.model.parameters()).is_cuda else "gloo"
        group = RankGroup(host, port, rank, world, store=self._store if rank == 0 else None, backend=backend)
        self.ctl.trainer = data_parallel(self.ctl.trainer, group)
        self.ctl.reference = ShardedReference(self.ctl.reference, group)
        return digest(self.ctl.trainer.model)

    def publish(self) -> Payload:
        return self.transport.publish(self.ctl.trainer.model, self.ctl.trainer.version)

    def send(self) -> float:
        t0 = time.time()
        self.transport.send(self.ctl.trainer.model)
        return time.time() - t0

    def digest(self) -> str:
        return digest(self.ctl.trainer.model)

    def weights(self) -> dict:
        """The trained parameters (every one of gpt_mini's; under LoRA the adapters: the base is model.hf_path's)."""
        return {k: v.clone() for k, v in trained_weights(self.ctl.trainer.model).items()}

    def state_dict(self) -> dict:
        state = {"trainer": self.ctl.trainer.state_dict(), "sync": self.ctl.syncer.state_dict()}
        if algorithm := self.ctl.algorithm.state_dict():
            state["algorithm"] = algorithm
        return state

    def load_state_dict(self, state: dict, weights: dict) -> None:
        copy_trained(self.ctl.trainer.model, weights)
        self.ctl.trainer.load_state_dict(state["trainer"])
        self.ctl.syncer.load_state_dict(state["sync"])
        self.ctl.algorithm.load_state_dict(state.get("algorithm", {}))


def actor_classes(threads: int = 1):
    """(RolloutWorker, TrainerWorker) as Ray actor classes, one CPU each (a logical resource: Ray lets them
    share fewer cores)."""
    ray = require_ray()
    return ray.remote(num_cpus=1)(RolloutWorker), ray.remote(num_cpus=1)(TrainerWorker)
