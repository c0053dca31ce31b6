"""Rollout workers that die are replaced, in every Ray topology (`system.max_restarts`, mixed into RaySystem).

    disaggregated   each worker's state is copied before it generates; the replacement loads the copy and redraws
                    exactly the groups the dead one would have: the run equals a run without the fault
    one_step_off    the replacement is built anew and given the trainer's current weights (a sync of its own,
    async           digest-checked), then draws the dead worker's share again: its in-flight chunk (async: the
                    ticket it held, so admission order and the staleness bound are kept) or its part of the
                    pending generation (one_step_off). Nothing is trained twice (the dead worker's groups never
                    arrived); the redrawn share is fresher (staleness 0 for it), and its prompts come from a new
                    generator (seeded like the dead one's first), so the run goes on but is not the faultless one.

A death shows where the driver next touches the worker: the result of its generate, or the check of a sync queued
behind it. A sync entry remembers which actor each apply went to; an apply that died with an actor already replaced
is recorded as None in `worker_digests` (the replacement's weights were checked when it got them). A gloo group
cannot take a new member: restarts need system.transport=object_store. `system/restarts` counts them.
"""
from __future__ import annotations

from rlpt.systems.workers import actor_classes


class Restarts:
    """RaySystem's restart methods (self: a RaySystem)."""

    def _replace_worker(self, r: int, cause: Exception, state: dict | None = None):
        """A new actor in worker r's place: loaded with `state`, or given the trainer's current weights."""
        ray = self.ray
        if self.restarts >= self.cfg.max_restarts:
            raise RuntimeError(f"rollout worker {r} died and system.max_restarts={self.cfg.max_restarts} restarts "
                               f"are used up: {cause}") from cause
        if self.cfg.transport == "gloo":
            raise RuntimeError(f"rollout worker {r} died; a gloo group cannot take a new member: restart needs "
                               "system.transport=object_store") from cause
        args, transport, verify, threads, group = self._make
        Rollout, _ = actor_classes()
        w = Rollout.remote(*args, r, transport, verify, threads, group)
        if state is not None:
            ray.get(w.load_state_dict.remote(state))
        else:
            ray.get(w.apply.remote(ray.get(self.trainer_actor.publish.remote())))   # raises on a digest mismatch
        self.workers[r] = w
        self._spawned.append(w)
        self.restarts += 1
        return w

    def _generate_restarting(self) -> list[dict]:
        """Disaggregated: each worker's state is copied before it generates; a worker that dies mid-step is
        replaced by a new actor loaded with that copy, which redraws exactly the groups it would have."""
        ray = self.ray
        states = ray.get([w.state_dict.remote() for w in self.workers])
        refs, outs = self._launch(), []
        for r, ref in enumerate(refs):
            try:
                outs.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                w = self._replace_worker(r, e, states[r])
                outs.append(ray.get(w.generate.remote(self.B // self.N)))
        return outs

    def _get_generated(self, r: int, ref, actor) -> dict:
        """Worker r's generate result (sent to `actor`); if that actor died, its share drawn again by a
        replacement (made now, unless a sync check already made one)."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as e:
            if not self.cfg.max_restarts:
                raise
            if self.workers[r] is actor:
                self._replace_worker(r, e)
            return ray.get(self.workers[r].generate.remote(self.B // self.N))

    def _applied_digests(self, entry: dict) -> list:
        """Each worker's digest after the sync `entry`; None for an apply whose actor died and was replaced."""
        ray = self.ray
        got = []
        for r, (ref, actor) in enumerate(zip(entry.pop("applies"), entry.pop("to"))):
            try:
                got.append(ray.get(ref)["digest"])
            except ray.exceptions.RayActorError as e:
                if not self.cfg.max_restarts:
                    raise
                if self.workers[r] is actor:
                    self._replace_worker(r, e)
                got.append(None)
        return got
