"""rlpt.systems without Ray: the admission gate, the oldest-first buffer, the async schedule under random delays
(the 200-step staleness property), the digest and the in-process transport, and the config key."""
from __future__ import annotations

import heapq
import random

import pytest
import torch

from rlpt.systems.staleness import AsyncSchedule, StalenessGate, VersionedBuffer
from rlpt.systems.transport import InProcess, Payload, WeightSyncError, digest, named_weights

from conftest import tiny_gpt


# -- the gate ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta,v,accepted,running,cap", [
    (0, 0, 0, 0, 4),      # η = 0: one batch at a time
    (0, 0, 4, 0, 0),      # ... and nothing more until the trainer takes a step
    (0, 1, 4, 0, 4),      # a version bump frees B
    (1, 0, 0, 0, 8),      # η = 1: two batches ahead
    (1, 0, 3, 2, 3),      # (1+0+1)·4 − (3+2)
    (2, 3, 20, 4, 0),     # (2+3+1)·4 = 24 = 20 + 4
    (2, 3, 25, 0, 0),     # never negative
])
def test_gate_capacity_table(eta, v, accepted, running, cap):
    g = StalenessGate(eta, 4, version=v, accepted=accepted, running=running)
    assert g.capacity() == cap


def test_gate_eta0_keeps_exactly_B_in_flight_and_bump_frees_B():
    g = StalenessGate(0, 3)
    g.admit(3)
    assert g.running == 3 and g.capacity() == 0
    with pytest.raises(RuntimeError, match="capacity"):
        g.admit(1)
    g.finish(3)
    assert g.capacity() == 0           # finished but not yet trained: still no room
    g.advance()
    assert g.capacity() == 3           # the trainer's step frees exactly B


def test_gate_max_running_and_recover():
    g = StalenessGate(4, 2, max_running=3)
    assert g.capacity() == 3
    g.recover(5)                        # resumed at version 5: 10 groups count as accepted, no burst
    assert (g.accepted, g.running, g.capacity()) == (10, 0, 3)
    assert StalenessGate(4, 2, version=5, accepted=10).capacity() == 10   # (4+5+1)·2 − 10
    assert StalenessGate(4, 2, version=5).capacity() == 20                # without recover: a burst of 2·(η+v+1)


# -- the buffer --------------------------------------------------------------------------------------------
def test_buffer_oldest_first_waits_for_the_head_and_never_discards():
    b = VersionedBuffer()
    t0, t1, t2 = b.reserve(), b.reserve(), b.reserve()
    b.put(t1, ["b0", "b1"], version=1)
    b.put(t2, ["c0"], version=2)
    assert b.ready() == 0 and b.take(1) is None        # the oldest chunk is still running
    b.put(t0, ["a0", "a1"], version=0)
    assert b.ready() == 5 and len(b) == 5
    assert b.take(3) == [("a0", 0), ("a1", 0), ("b0", 1)]   # a chunk may be split across batches
    assert b.take(3) is None
    assert b.take(2) == [("b1", 1), ("c0", 2)]
    assert len(b) == 0
    with pytest.raises(KeyError):
        b.put(t0, ["again"], version=0)


def test_buffer_state_roundtrip_and_refuses_running_chunks():
    b = VersionedBuffer()
    t = b.reserve()
    with pytest.raises(RuntimeError, match="running"):
        b.state_dict()
    b.put(t, ["x", "y"], version=3)
    c = VersionedBuffer()
    c.load_state_dict(b.state_dict())
    assert c.take(2) == [("x", 3), ("y", 3)]
    assert c.reserve() == 1


# -- the async schedule under random delays: the staleness bound, 200 steps ---------------------------------
def simulate(eta: int, workers: int, B: int, steps: int, seed: int) -> dict:
    """Event-driven run of AsyncSchedule: each chunk takes a random time (long tails included), the trainer a
    random time per step; a worker's weights are the trainer's version when its chunk starts (the sync is queued
    before anything admitted after it). Returns every trained group's staleness and the in-flight peaks."""
    rng = random.Random(seed)
    sched = AsyncSchedule(StalenessGate(eta, B, max_running=workers * (B // workers)), chunk=B // workers)
    now, version, idle, events = 0.0, 0, list(range(workers)), []
    stale, peak, trained, admitted = [], 0, 0, 0
    train_end = None
    while trained < steps:
        for w, ticket, n in sched.admit(idle):
            idle.remove(w)
            admitted += n
            dur = rng.expovariate(1.0) * (5 if rng.random() < 0.1 else 1)   # a long tail now and then
            groups = [f"g{ticket}.{i}" for i in range(n)]
            heapq.heappush(events, (now + dur, "gen", w, ticket, groups, version))
        peak = max(peak, sched.gate.running)
        if train_end is None and (batch := sched.batch()) is not None:
            stale += [version - v for _, v in batch]
            train_end = now + rng.uniform(0.2, 2.0)
            heapq.heappush(events, (train_end, "train", None, None, None, None))
        now, kind, w, ticket, groups, v = heapq.heappop(events)
        if kind == "gen":
            sched.finished(ticket, groups, v)
            idle.append(w)
        else:
            version += 1
            sched.trained()
            trained += 1
            train_end = None
    return {"stale": stale, "peak": peak, "admitted": admitted, "left": len(sched.buffer) + sched.gate.running}


@pytest.mark.parametrize("eta", [0, 1, 4])
def test_async_schedule_staleness_bound_200_steps(eta):
    for seed in range(3):
        r = simulate(eta, workers=4, B=8, steps=200, seed=seed)
        assert len(r["stale"]) == 200 * 8
        assert max(r["stale"]) <= eta                          # the bound, on every trained group
        assert r["admitted"] == len(r["stale"]) + r["left"]    # nothing discarded
        if eta == 0:
            assert set(r["stale"]) == {0}
            assert r["peak"] == 8                              # exactly B in flight
        else:
            assert max(r["stale"]) == eta                      # the bound is reached: the gate is what holds it


def test_async_schedule_rejects_a_short_chunk():
    s = AsyncSchedule(StalenessGate(1, 4), chunk=2)
    (w, ticket, n), = s.admit(["w0"])
    with pytest.raises(RuntimeError, match="1 groups for a chunk of 2"):
        s.finished(ticket, ["only one"], 0)


# -- digest and the in-process transport -------------------------------------------------------------------
def test_digest_by_hand_and_sensitivity():
    import hashlib
    named = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor([[3.0]], dtype=torch.float64)}
    h = hashlib.sha256()
    for k in ("a", "b"):   # name order, fp32 bytes
        h.update(k.encode())
        h.update(named[k].float().numpy().tobytes())
    assert digest(named) == h.hexdigest()
    m = tiny_gpt(0)
    d = digest(m)
    assert d == digest(tiny_gpt(0)) and d != digest(tiny_gpt(1))
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] += 1e-7
    assert digest(m) != d


def test_in_process_transport_copies_in_place_and_verifies():
    src, dst = tiny_gpt(0), tiny_gpt(1)
    ptrs = {k: p.data_ptr() for k, p in dst.named_parameters()}
    versions = {k: p._version for k, p in dst.named_parameters()}
    t = InProcess()
    assert t.apply(t.publish(src, version=7), dst) == 7
    assert digest(dst) == digest(src)
    assert all(p.data_ptr() == ptrs[k] and p._version > versions[k] for k, p in dst.named_parameters())
    bad = Payload(8, digest(tiny_gpt(2)), named_weights(src))   # bytes of one model, digest of another
    with pytest.raises(WeightSyncError, match="version 8 failed its check"):
        t.apply(bad, dst)
    with pytest.raises(WeightSyncError, match="parameter names"):
        t.apply(Payload(9, None, {"x": torch.zeros(1)}), dst)


def test_system_config_key(tiny_train_job):
    job = tiny_train_job("system.topology=async", "system.rollout_workers=2", "system.max_staleness=3")
    assert (job.system.topology, job.system.rollout_workers, job.system.max_staleness) == ("async", 2, 3)
    assert tiny_train_job().system.topology == "colocated"
    from rlpt.config import ConfigError
    with pytest.raises(ConfigError, match="system.topology"):
        tiny_train_job("system.topology=pipelined")
    with pytest.raises(ConfigError, match="system.max_staleness"):
        tiny_train_job("system.max_staleness=-1")


def test_missing_ray_names_the_extra(monkeypatch):
    import sys

    from rlpt.systems.workers import require_ray
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` then raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'rlpt\[ray\]'"):
        require_ray()
