"""The Ray topologies: `RaySystem` stands where `rlpt train` keeps its Controller (step, state, trainer.model).

    disaggregated   generate on N workers ─▶ train ─▶ sync            one after the other (η = 0)
    one_step_off    generate(i+1) ∥ train(i) ─▶ sync                   staleness exactly 1 from step 1 (slime)
    async           workers generate whenever the gate admits; the trainer takes B groups oldest-first

Each step returns the in-process Controller's metrics (the trainer actor runs that very step), with the timings
replaced by what the actors measured (`time/rollout`, `time/verify`: the slowest worker; `time/train`, `time/ref`
from the trainer; `time/sync`: publish to the last worker's check; `time/step`: the driver's wall clock), plus:

    system/staleness_mean|max   trainer version − weights version of the trained groups, in syncs
                                (the optimizer-step count of rlpt.framework's `staleness/*` is finer)
    system/syncs                syncs so far; every one verified by digest when system.verify
    system/sync_bytes           bytes this step's sync moved to each worker (0 without one; LoRA: the adapters')
    system/restarts             rollout workers replaced so far (system.max_restarts, rlpt.systems.restart)
    timeline/<role>_t0|t1       start and end of each role in the step, seconds from the step's start
                                (rollout0.., train, sync): the Gantt chart of one step

Actors run one call at a time, in the order called, so a sync queued on a worker lands after the generation in
flight there (no weights torn mid-generation, slime's rule) and before anything admitted after it: the staleness
bound of rlpt.systems.staleness rests on that ordering.

Checkpoints: `state_dict()` has the in-process Controller's keys (trainer, rollout and env of worker 0, sync,
algorithm), so a one-worker Ray run and a colocated run read each other's checkpoints, plus `workers` (every
worker's rollout + env) and `system` (one_step_off: the generation in flight, so resume is exact; async: the
buffer and the gate, resumed with AReaL's recover rule).
"""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable

import torch

from rlpt.systems.ddp import start_ranks, wait_all
from rlpt.systems.partial import token_staleness
from rlpt.systems.restart import Restarts
from rlpt.systems.streaming import AsyncDriver, merge_stats
from rlpt.systems.transport import WeightSyncError, copy_trained, trained_weights
from rlpt.systems.workers import actor_classes, require_ray


class _TrainerView:
    """`ctl.trainer` for rlpt.train: `model` is a local copy of the trainer actor's policy, refreshed on read."""

    def __init__(self, system: RaySystem, model: torch.nn.Module):
        self._system, self._model, self.pulled = system, model, 0

    @property
    def model(self) -> torch.nn.Module:
        s = self._system
        if s.version != self.pulled:
            copy_trained(self._model, s.ray.get(s.trainer_actor.weights.remote()))   # under LoRA the adapters
            self.pulled = s.version
        return self._model

    @property
    def version(self) -> int:
        return self._system.version


class RaySystem(AsyncDriver, Restarts):
    def __init__(self, job, build: Callable, init, local=None, threads: int | None = None,
                 actors: tuple[list, object] | None = None):
        """Start (or attach to) Ray and the actors for `job.system`. `build` is rlpt.train.build; `local` the
        in-process Controller rlpt.train built (its trainer's model is what checkpoints and evaluation read,
        its env what evaluation scores with); None builds one. `actors` = (rollout workers, trainer) reuses
        actors an earlier RaySystem made (`.actors`; their roles are rebuilt from this job, `close` leaves them)."""
        self.ray = ray = require_ray()
        sc = job.system
        if sc.topology not in ("disaggregated", "one_step_off", "async"):
            raise ValueError(f"RaySystem runs disaggregated, one_step_off or async, not system.topology="
                             f"{sc.topology!r}")
        B, N = job.rollout.prompts_per_step, sc.rollout_workers
        if B % N:
            raise ValueError(f"rollout.prompts_per_step ({B}) must be a multiple of system.rollout_workers ({N}): "
                             "each worker samples an equal share")
        if sc.topology != "disaggregated" and job.sync.every != 1:
            raise ValueError(f"system.topology={sc.topology} syncs after every train step (its staleness bound "
                             f"counts syncs): set sync.every=1 (got {job.sync.every})")
        if not ray.is_initialized():
            if sc.address:
                ray.init(address=sc.address, log_to_driver=False)
            else:   # RAY_ADDRESS, if set, attaches; else a local Ray with a CPU per actor (logical: may oversubscribe)
                ray.init(num_cpus=max(os.cpu_count() or 1, N + sc.trainer_workers), include_dashboard=False,
                         log_to_driver=False)
        self.job, self.cfg, self.B, self.N = job, sc, B, N
        threads = threads or job.run.threads or 1
        Rollout, Trainer = actor_classes()
        args, group = (build, job, init), f"rlpt_sync_{uuid.uuid4().hex[:12]}"   # one collective group per system
        self.owns_actors = actors is None
        self._make = (args, sc.transport, sc.verify, threads, group)   # to restart a rollout worker
        if actors is None:
            self.workers = [Rollout.remote(*args, r, sc.transport, sc.verify, threads, group) for r in range(N)]
            self.trainer_actor = Trainer.remote(*args, sc.transport, sc.verify, threads, group)
        else:
            if len(actors[0]) < N:
                raise ValueError(f"{len(actors[0])} rollout actors given, system.rollout_workers={N}")
            self.workers, self.trainer_actor = list(actors[0][:N]), actors[1]
            ray.get([w.rebuild.remote(*args, r, sc.transport, sc.verify, threads, group)
                     for r, w in enumerate(self.workers)] +
                    [self.trainer_actor.rebuild.remote(*args, sc.transport, sc.verify, threads, group)])
        info = ray.get(self.trainer_actor.info.remote())
        if sc.topology == "async" and info["group_filter"]:
            if self.owns_actors:
                for a in [*self.workers, self.trainer_actor]:
                    ray.kill(a)
            raise ValueError(f"system.topology=async cannot run {job.algorithm.name}'s dynamic sampling (a group "
                             "filter re-draws groups, and the gate counts what it admitted): use disaggregated or "
                             "one_step_off")
        self.trainer_ranks = [self.trainer_actor]   # data-parallel trainers (rlpt.systems.ddp); rank 0 syncs
        if sc.trainer_workers > 1:
            self.trainer_ranks = start_ranks(ray, Trainer, (*args, sc.transport, sc.verify, threads, group),
                                             sc.trainer_workers, self.trainer_actor)
        if sc.transport == "gloo":
            ray.get([self.trainer_actor.join.remote(N + 1, 0)] +
                    [w.join.remote(N + 1, r + 1) for r, w in enumerate(self.workers)])
        if local is None:
            torch.manual_seed(job.run.seed)
            local, _ = build(job, init)
        self.env = local.env
        self.k = job.rollout.k
        self.trainer = _TrainerView(self, local.trainer.model)
        self.version = info["version"]      # the trainer's, as of the last step
        self.syncs = 0
        self.restarts = 0                   # rollout workers restarted (system.max_restarts; rlpt.systems.restart)
        self._spawned: list = []            # actors made to replace dead ones (stopped by close)
        self.sync_log: list[dict] = []      # every sync: version, trainer digest, each worker's verified digest
        self._pending = None                # one_step_off: the generation in flight (refs, or results on resume)
        self._async = None

    # -- one step ------------------------------------------------------------------------------------------
    def step(self) -> dict:
        t_step = time.time()
        top = self.cfg.topology
        if top == "disaggregated":
            outs = self._generate_restarting() if self.cfg.max_restarts else self.ray.get(self._launch())
        elif top == "one_step_off":
            if self._pending is None:
                self._pending = self._launch()
            outs = self._resolve(self._pending)
            self._pending = self._launch()   # step i+1's generation, with the weights trained up to step i-1
        else:
            return self._async_step(t_step)
        groups, stats = self._gather(outs)
        res = self._trained(self._train(groups, stats))
        return self._finish(t_step, res, outs, groups, [o["version"] for o in outs for _ in o["groups"]])

    def _train(self, groups: list, stats: dict):
        """Every trainer rank steps on the same groups; -> rank 0's ref (its metrics are the step's)."""
        refs = [t.step.remote(groups, stats) for t in self.trainer_ranks]
        self._rank_refs = refs
        return refs[0]

    def _trained(self, ref) -> dict:
        return wait_all(self.ray, self._rank_refs)[0]

    def _launch(self) -> list:
        n = self.B // self.N
        self._launched_to = list(self.workers)   # which actor each ref belongs to (a replaced one redraws)
        return [w.generate.remote(n) for w in self.workers]

    def _resolve(self, pending: list) -> list[dict]:
        if pending and isinstance(pending[0], dict):   # restored from a checkpoint: already results
            return pending
        return [self._get_generated(r, ref, a) for r, (ref, a) in enumerate(zip(pending, self._launched_to))]

    @staticmethod
    def _gather(outs: list[dict]) -> tuple[list, dict]:
        """Concatenate the workers' groups (renumbered: each worker numbers its own from 0), merge their stats."""
        groups, offset = [], 0
        for o in outs:
            for g in o["groups"]:
                for t in g:
                    t.group += offset
            offset += len(o["groups"])
            groups += o["groups"]
        return groups, merge_stats([o["stats"] for o in outs])

    def _finish(self, t_step: float, res: dict, outs: list[dict], groups: list, versions: list[int]) -> dict:
        m = dict(res["metrics"])
        t_trained = time.time()
        if m.get("sync/done"):
            self._sync()
        self.version = res["version"]
        stale = [res["version_before"] - v for v in versions]
        m["system/staleness_mean"] = sum(stale) / len(stale)
        m["system/staleness_max"] = float(max(stale))
        m |= token_staleness(groups, res["version_before"])     # per token (partial rollouts mix versions)
        m["system/syncs"] = float(self.syncs)
        m["system/sync_bytes"] = float(self.sync_log[-1]["bytes"]) if m.get("sync/done") else 0.0
        m["system/restarts"] = float(self.restarts)
        by_rank: dict[int, list[dict]] = {}
        for o in outs:
            by_rank.setdefault(o["rank"], []).append(o)
        busy = {r: sum(o["t1"] - o["t0"] for o in rs) for r, rs in by_rank.items()}
        verify = {r: sum(o["stats"].get("time/verify", 0.0) for o in rs) for r, rs in by_rank.items()}
        m["time/rollout"] = max(busy[r] - verify[r] for r in busy)
        m["time/verify"] = max(verify.values())
        m["time/sync"] = time.time() - t_trained if m.get("sync/done") else 0.0
        for r, rs in by_rank.items():
            m[f"timeline/rollout{r}_t0"] = min(o["t0"] for o in rs) - t_step
            m[f"timeline/rollout{r}_t1"] = max(o["t1"] for o in rs) - t_step
        m["timeline/train_t0"], m["timeline/train_t1"] = res["t0"] - t_step, res["t1"] - t_step
        m["timeline/sync_t0"], m["timeline/sync_t1"] = t_trained - t_step, time.time() - t_step
        m["time/step"] = time.time() - t_step
        return m

    # -- weight sync ---------------------------------------------------------------------------------------
    def _sync(self) -> None:
        """Trainer → every worker, through the transport, each worker checking the digest. Blocks until done,
        except in async, where the applies are queued behind the workers' generations and checked later."""
        ray = self.ray
        payload = ray.get(self.trainer_actor.publish.remote())
        applies = [w.apply.remote(payload) for w in self.workers]
        sends = [self.trainer_actor.send.remote()] if self.cfg.transport == "gloo" else []
        self.syncs += 1
        entry = {"version": payload.version, "digest": payload.digest, "applies": applies, "to": list(self.workers),
                 "bytes": payload.nbytes}
        self.sync_log.append(entry)
        if self.cfg.topology != "async":
            self._check_sync(entry, sends)
        else:
            self._sends = getattr(self, "_sends", []) + sends

    def _check_sync(self, entry: dict, sends: list = ()) -> None:
        got = self._applied_digests(entry)     # None: a worker that died and was replaced (rlpt.systems.restart)
        self.ray.get(list(sends))
        entry["worker_digests"] = got
        if any(g is not None and g != entry["digest"] for g in got):   # workers raise first; this guards a transport
            raise WeightSyncError(f"sync to version {entry['version']}: worker digests {got} != {entry['digest']}")

    def check_syncs(self) -> None:
        """Wait for every queued sync and check it (async queues them)."""
        for entry in self.sync_log:
            if "applies" in entry:
                self._check_sync(entry)
        self.ray.get(getattr(self, "_sends", []))
        self._sends = []

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        ray = self.ray
        self.check_syncs()
        system: dict = {"topology": self.cfg.topology, "syncs": self.syncs}
        if self.cfg.topology == "one_step_off" and self._pending is not None:
            self._pending = self._resolve(self._pending)
            system["pending"] = self._pending
        if self._async is not None:   # let what is in flight finish: a running chunk cannot be saved
            a = self._async
            while a["inflight"]:       # partial rollouts: segments until every chunk has finished
                self._collect(list(a["inflight"]))
            system["buffer"] = a["sched"].buffer.state_dict()
            system["gate"] = a["sched"].gate.state_dict()
            system["done"] = a["done"]
        workers = ray.get([w.state_dict.remote() for w in self.workers])
        state = ray.get(self.trainer_actor.state_dict.remote())
        state |= {"rollout": workers[0]["rollout"], "env": workers[0]["env"], "workers": workers, "system": system}
        return state

    def load_state_dict(self, state: dict) -> None:
        """After rlpt.train loaded the checkpoint's weights into `trainer.model`: push them and every role's state
        into the actors."""
        ray = self.ray
        workers = state.get("workers") or [{"rollout": state["rollout"], "env": state["env"]}]
        if len(workers) != self.N:
            raise ValueError(f"the checkpoint has {len(workers)} rollout workers' state, this run "
                             f"system.rollout_workers={self.N}: resume with the same number")
        weights = {k: v.clone() for k, v in trained_weights(self.trainer._model).items()}   # LoRA: adapters only
        ray.get([t.load_state_dict.remote(state, weights) for t in self.trainer_ranks] +
                [w.load_state_dict.remote(s) for w, s in zip(self.workers, workers)])
        self.version = ray.get(self.trainer_actor.info.remote())["version"]
        self.trainer.pulled = self.version
        system = state.get("system", {})
        self.syncs = system.get("syncs", 0)
        self._pending = system.get("pending")
        if "buffer" in system:
            self._async_init()
            self._async["sched"].buffer.load_state_dict(system["buffer"])
            gate = self._async["sched"].gate
            gate.version, gate.accepted, gate.running = system["gate"]["version"], system["gate"]["accepted"], 0
            self._async["done"] = system.get("done", [])

    @property
    def actors(self) -> tuple[list, object]:
        return self.workers, self.trainer_actor

    def close(self) -> None:
        """Check the queued syncs, refresh trainer.model, stop the actors it made (the Ray runtime stays up)."""
        if self._async is not None:   # let the chunks in flight finish (a reused actor must be idle)
            self.ray.get(list(self._async["inflight"]))
        self.check_syncs()
        self.trainer.model   # noqa: B018 - pull the last weights before the trainer actor goes
        for a in [*self.workers, self.trainer_actor] if self.owns_actors else self._spawned:
            self.ray.kill(a)
        for a in self.trainer_ranks[1:]:
            self.ray.kill(a)
