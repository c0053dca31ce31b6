"""Bounded staleness without discarding: AReaL's admission gate and an oldest-first buffer (pure, no Ray).

    capacity(v) = min(max_running − running,  (η + v + 1)·B − (accepted + running))      admit while > 0

v is the trainer's version (train steps done), B the groups one train step consumes, η `system.max_staleness`,
`accepted` every group that finished generating since the start (consumed ones included), `running` the groups
in flight (AReaL, areal/infra/staleness_manager.py). The rule bounds staleness by construction when the buffer
hands groups out in admission order: the n-th group admitted (0-based) is trained at step ⌊n/B⌋; it was
admitted at a version v_a with n < (η + v_a + 1)·B, and sampled with weights w ≥ v_a (a sync is queued on
every worker before anything admitted after it), so  ⌊n/B⌋ − w ≤ η.  With η = 0 exactly B groups are ever
in flight and every group is trained by the weights it was sampled with: the synchronous loop.

Nothing is discarded (tinker-cookbook #822: dropping over-stale groups biases training toward the fast, easy
prompts); the price is that a step waits for the oldest group still running, the long tail that partial
rollouts (lesson 22b) would cut. After a resume `recover(v)` sets accepted = v·B, else capacity bursts
(AReaL's on_version_recovered).

`AsyncSchedule` is the driver's whole policy (gate + buffer + which worker gets what), free of Ray, so the
200-step property test drives the very code the Ray runner does, with simulated delays.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class StalenessGate:
    max_staleness: int                 # η
    batch: int                         # B: groups per train step
    max_running: int | None = None     # groups in flight at most (None: only the staleness term)
    version: int = 0                   # v: the trainer's train steps done
    accepted: int = 0                  # groups finished since the start (consumed included)
    running: int = 0                   # groups admitted and not yet finished

    def __post_init__(self):
        if self.max_staleness < 0 or self.batch < 1:
            raise ValueError(f"StalenessGate needs max_staleness >= 0 and batch >= 1, got {self.max_staleness} "
                             f"and {self.batch}")

    def capacity(self) -> int:
        """Groups that may be admitted now: (η + v + 1)·B − (accepted + running), and room under max_running."""
        cap = (self.max_staleness + self.version + 1) * self.batch - (self.accepted + self.running)
        if self.max_running is not None:
            cap = min(cap, self.max_running - self.running)
        return max(cap, 0)

    def admit(self, n: int) -> None:
        if n > self.capacity():
            raise RuntimeError(f"admitting {n} groups past the staleness gate's capacity {self.capacity()}")
        self.running += n

    def finish(self, n: int) -> None:
        if n > self.running:
            raise RuntimeError(f"{n} groups finished but only {self.running} were running")
        self.running -= n
        self.accepted += n

    def advance(self) -> None:
        """The trainer finished a step: v + 1, which frees B slots."""
        self.version += 1

    def recover(self, version: int) -> None:
        """After a resume at `version`: the v·B groups trained so far count as accepted, nothing is running."""
        self.version, self.accepted, self.running = version, version * self.batch, 0

    def state_dict(self) -> dict:
        return {"version": self.version, "accepted": self.accepted, "running": self.running}


@dataclass
class VersionedBuffer:
    """Finished groups in admission order; `take(n)` hands out the oldest n once all of them have finished."""
    _slots: OrderedDict = field(default_factory=OrderedDict)   # ticket -> [(group, weights version)] | None (running)
    _next: int = 0

    def reserve(self) -> int:
        """A ticket for a chunk just admitted: its groups will be handed out in this order."""
        ticket, self._next = self._next, self._next + 1
        self._slots[ticket] = None
        return ticket

    def put(self, ticket: int, groups: list, version: int) -> None:
        if ticket not in self._slots or self._slots[ticket] is not None:
            raise KeyError(f"ticket {ticket} was not reserved, or is already filled")
        self._slots[ticket] = [(g, version) for g in groups]

    def ready(self) -> int:
        """Groups available from the head before the first chunk still running."""
        n = 0
        for slot in self._slots.values():
            if slot is None:
                break
            n += len(slot)
        return n

    def take(self, n: int) -> list[tuple[object, int]] | None:
        """The n oldest groups with the version each was sampled with; None while fewer than n are ready."""
        if self.ready() < n:
            return None
        out = []
        while len(out) < n:
            ticket, slot = next(iter(self._slots.items()))
            need = n - len(out)
            out += slot[:need]
            if len(slot) > need:
                self._slots[ticket] = slot[need:]
            else:
                del self._slots[ticket]
        return out

    def __len__(self) -> int:
        """Groups finished and not yet handed out."""
        return sum(len(s) for s in self._slots.values() if s is not None)

    def state_dict(self) -> dict:
        """What a checkpoint holds: the finished groups (a running chunk cannot be saved: drain first)."""
        if any(s is None for s in self._slots.values()):
            raise RuntimeError("the buffer has chunks still running: wait for them before saving")
        return {"slots": [s for s in self._slots.values()]}

    def load_state_dict(self, state: dict) -> None:
        self._slots = OrderedDict((i, s) for i, s in enumerate(state["slots"]))
        self._next = len(self._slots)


@dataclass
class AsyncSchedule:
    """The async driver's policy: which idle worker generates how many groups, and when a batch is ready.

        admit(idle)  -> [(worker, ticket, n_groups)]   as many chunks as the gate allows, one per idle worker
        finished(ticket, groups, version)               a chunk came back
        batch()      -> [(group, version)] | None       B groups in admission order once they have all finished
        trained()                                       the trainer's version advanced (frees B slots)
    """
    gate: StalenessGate
    chunk: int                          # groups per generate call
    buffer: VersionedBuffer = field(default_factory=VersionedBuffer)
    _sizes: dict = field(default_factory=dict)   # ticket -> groups admitted

    def admit(self, idle: list) -> list[tuple[object, int, int]]:
        out = []
        for w in idle:
            n = min(self.chunk, self.gate.capacity())
            if n <= 0:
                break
            self.gate.admit(n)
            ticket = self.buffer.reserve()
            self._sizes[ticket] = n
            out.append((w, ticket, n))
        return out

    def finished(self, ticket: int, groups: list, version: int) -> None:
        n = self._sizes.pop(ticket)
        if len(groups) != n:
            raise RuntimeError(f"a rollout worker returned {len(groups)} groups for a chunk of {n}")
        self.buffer.put(ticket, groups, version)
        self.gate.finish(n)

    def size(self, ticket: int) -> int:
        """Groups admitted under `ticket` and not yet finished (to request them again from a restarted worker)."""
        return self._sizes[ticket]

    def batch(self) -> list[tuple[object, int]] | None:
        return self.buffer.take(self.gate.batch)

    def trained(self) -> None:
        self.gate.advance()
