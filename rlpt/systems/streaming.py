"""The async topology's driver: workers generate whenever the staleness gate admits, the trainer takes B groups
oldest-first (rlpt.systems.staleness holds the policy; this is its Ray side, mixed into RaySystem).

    admit:   every idle worker gets a chunk of groups while the gate's capacity allows
    collect: a finished chunk goes into the buffer at its ticket; its worker is idle again
    step:    wait until B groups are ready in admission order, train on them, and keep admitting and
             collecting while the trainer trains

A sync is queued on every worker right after each train step (RaySystem._sync), behind the generation running
there and ahead of anything admitted later: the ordering the staleness bound rests on.
"""
from __future__ import annotations

from rlpt.systems.staleness import AsyncSchedule, StalenessGate


def merge_stats(stats: list[dict]) -> dict:
    """Rollout stats of several workers (or chunks): times are the slowest's, counts add up, the rest average."""
    out: dict = {}
    for k in {k for s in stats for k in s}:
        vals = [float(s[k]) for s in stats if k in s]
        if k.startswith("time/"):
            out[k] = max(vals)
        elif k in ("sampling/draws",) or k.startswith("sampling/groups_"):
            out[k] = sum(vals)
        else:
            out[k] = sum(vals) / len(vals)
    return out


class AsyncDriver:
    """RaySystem's async methods (self: a RaySystem)."""

    def _async_init(self) -> None:
        chunk = self.B // self.N
        gate = StalenessGate(self.cfg.max_staleness, self.B, max_running=self.N * chunk)
        self._async = {"sched": AsyncSchedule(gate, chunk), "idle": list(range(self.N)), "inflight": {},
                       "done": []}

    def _admit(self) -> None:
        a = self._async
        for w, ticket, n in a["sched"].admit(a["idle"]):
            a["idle"].remove(w)
            a["inflight"][self._generate(w, n)] = (w, ticket, self.workers[w])

    def _generate(self, w: int, n: int):
        """Worker w's chunk of n groups (n = 0: the next segment of its chunk in progress, partial rollouts)."""
        if self.cfg.partial_rollouts:
            return self.workers[w].generate_partial.remote(n, self.cfg.segment_tokens)
        return self.workers[w].generate.remote(n)

    def _collect(self, refs: list) -> None:
        a = self._async
        for ref in refs:
            w, ticket, actor = a["inflight"].pop(ref)
            try:
                out = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as e:   # the worker died: a replacement redraws the chunk
                if not self.cfg.max_restarts:
                    raise
                if self.workers[w] is actor:
                    self._replace_worker(w, e)
                a["inflight"][self._generate(w, a["sched"].size(ticket))] = (w, ticket, self.workers[w])
                continue
            if not out.get("done", True):   # a segment: the chunk goes on (a sync queued meanwhile lands first)
                a["inflight"][self._generate(w, 0)] = (w, ticket, actor)
                continue
            a["sched"].finished(ticket, out["groups"], out["version"])
            a["idle"].append(w)
            a["done"].append(out)

    def _async_step(self, t_step: float) -> dict:
        ray = self.ray
        if self._async is None:
            self._async_init()
        a = self._async
        while (batch := a["sched"].batch()) is None:
            self._admit()
            ready, _ = ray.wait(list(a["inflight"]), num_returns=1)
            self._collect(ready)
        outs, a["done"] = a["done"], []
        groups = [g for g, _ in batch]
        for i, g in enumerate(groups):
            for t in g:
                t.group = i
        stats = merge_stats([o["stats"] for o in outs]) if outs else {}
        train = self._train(groups, stats)
        while True:   # keep the workers busy while the trainer trains
            self._admit()
            ready, _ = ray.wait([train, *a["inflight"]], num_returns=1)
            if train in ready:
                break
            self._collect(ready)
        res = self._trained(train)
        a["sched"].trained()
        return self._finish(t_step, res, outs or [{"groups": [], "stats": {}, "rank": 0, "t0": t_step,
                                                    "t1": t_step, "version": 0}],
                            groups, [v for g, v in batch for _ in g])

