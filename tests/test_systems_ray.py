"""rlpt.systems on a local Ray: the roles as actors give the in-process Controller's metrics (disaggregated, η = 0),
resume exactly from their state, verify every weight sync by digest (object store and gloo), one_step_off trains
on weights exactly one sync old, async stays within η under random rollout delays (and with partial rollouts),
and a killed rollout worker is replaced in every topology.

One local Ray per session (`ray.init(num_cpus=4)`, no dashboard, usage stats off; ~10 s to start here) and five
actors (each imports torch and rlpt: ~5 s): the two rlpt train makes, first (the 4 logical CPUs hold 4 actors at
a time), then a pool of three that the other tests rebuild (the last two kill its workers). The file takes
3-4 minutes on the 2 shared cores; the tests are end-to-end runs, hence `slow`. The 200-step staleness property
runs without Ray, in test_systems.py.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from rlpt.systems.transport import Payload, digest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

# the tiny RL job (conftest's TINY_RL) started from a longer SFT so most steps have mixed groups and really train
SFT_STEPS = ["sft.steps=200", "sft.ckpt_every=200", "steps=5", "eval.every=100", "ckpt_every=100"]
NOT_COMPARED = ("time/", "mem/", "timeline/", "system/")


@pytest.fixture(scope="session")
def ray_local():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sft_start(tmp_path_factory):
    from rlpt.train import load_train_job, sft_init

    from conftest import TINY_RL
    out = tmp_path_factory.mktemp("systems")
    job = load_train_job(None, [*TINY_RL, *SFT_STEPS, f"run.out_dir={out}", "run.name=start"])
    return out, sft_init(job, resume=False)


@pytest.fixture(scope="session")
def actor_pool(ray_local, sft_start):
    """Two rollout actors and a trainer actor, made once (each costs seconds of imports) and rebuilt by every
    RaySystem that takes them (`actors=`)."""
    from rlpt.systems.workers import actor_classes
    from rlpt.train import build
    Rollout, Trainer = actor_classes()
    args = (build, job_for(sft_start), sft_start[1])
    workers = [Rollout.remote(*args, r, "object_store", True) for r in range(2)]
    trainer = Trainer.remote(*args, "object_store", True)
    yield workers, trainer
    for a in (*workers, trainer):
        ray.kill(a)


def job_for(sft_start, *overrides):
    from rlpt.train import load_train_job

    from conftest import TINY_RL
    out, init = sft_start
    return load_train_job(None, [*TINY_RL, *SFT_STEPS, f"run.out_dir={out}", f"init_from={init}", *overrides])


def compared(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith(NOT_COMPARED)}


def assert_same(a: dict, b: dict, step: int) -> None:
    a, b = compared(a), compared(b)
    assert a.keys() == b.keys(), (step, sorted(a.keys() ^ b.keys()))
    for k in a:
        if isinstance(a[k], list):
            assert a[k] == b[k], (step, k)
        else:
            assert abs(a[k] - b[k]) <= 1e-6, (step, k, a[k], b[k])


def test_one_step_off_over_gloo_through_rlpt_train(ray_local, sft_start):
    """`rlpt train … system.topology=one_step_off system.transport=gloo`: from step 2 on every trained group was
    sampled one step before the trainer's version (exactly one sync behind when that step trained; in optimizer
    steps Δ·M·E + j); every gloo broadcast arrives bit-equal (digest). `--resume` from the step-2 checkpoint
    replays steps 3-5 exactly: the checkpoint holds the generation that was in flight."""
    from rlpt.train import run_train
    over = ["system.topology=one_step_off", "system.transport=gloo", "ckpt_every=2", "keep_checkpoints=5"]
    job = job_for(sft_start, *over, "run.name=osoff")
    ctl, run, _ = run_train(job)
    rows = [r for r in run.read_metrics() if "system/staleness_max" in r]
    assert len(rows) == 5 and sum(r["step/skipped"] == 0 for r in rows[:-1]) >= 2
    assert rows[0]["system/staleness_max"] == 0                   # step 1 trains on the first generation: fresh
    M = job.trainer.mini_batches * job.trainer.epochs
    for prev, r in zip(rows, rows[1:]):   # sampled before the previous step trained: one version behind, if it did
        lag = 1.0 - prev["step/skipped"]
        assert r["system/staleness_mean"] == r["system/staleness_max"] == lag
        if not r["step/skipped"] and lag:
            assert r["staleness/max"] == 2 * M - 1                  # (Δ = 1)·M + the last mini-batch's index
            assert r["staleness/mean"] == M + (M - 1) / 2
        for k in ("timeline/rollout0_t0", "timeline/train_t1", "time/step"):
            assert k in r
    assert ctl.syncs >= 3 and len(ctl.sync_log) == ctl.syncs
    assert all(e["worker_digests"] == [e["digest"]] for e in ctl.sync_log)
    assert len({e["digest"] for e in ctl.sync_log}) == ctl.syncs          # each sync moved new weights

    b_dir = run.dir.parent / "resumed"                   # the same run, cut back to its step-2 checkpoint
    shutil.copytree(run.dir, b_dir)
    (b_dir / "checkpoints" / "latest").write_text("step_00000002")
    for step in (4, 5):
        shutil.rmtree(b_dir / "checkpoints" / f"step_{step:08d}")
    ctl_b, run_b, _ = run_train(job_for(sft_start, *over, "run.name=resumed"), resume=True)
    machine = ("time/", "mem/", "timeline/")
    strip = [{k: v for k, v in r.items() if not k.startswith(machine)} for r in run_b.read_metrics()]
    assert strip == [{k: v for k, v in r.items() if not k.startswith(machine)} for r in run.read_metrics()]
    assert digest(ctl_b.trainer.model) == digest(ctl.trainer.model)


def test_disaggregated_equals_in_process_and_resumes(actor_pool, sft_start):
    """η = 0 on actors = the in-process Controller over 5 GRPO steps (same seeds), every sync verified; restoring
    the step-3 state into the actors replays steps 4-5 bit for bit."""
    from rlpt.systems.runner import RaySystem
    from rlpt.train import build
    init = sft_start[1]
    job = job_for(sft_start, "system.topology=disaggregated")
    torch.manual_seed(job.run.seed)
    ctl, _ = build(job, init)
    local = [ctl.step() for _ in range(5)]
    assert sum(m["step/skipped"] == 0 for m in local) >= 3          # the comparison covers real training
    torch.manual_seed(job.run.seed)
    sys_ = RaySystem(job, build, init, actors=actor_pool)
    try:
        got, saved = [], None
        for i in range(5):
            got.append(sys_.step())
            if i == 2:
                saved = (sys_.state_dict(), {k: v.clone() for k, v in sys_.trainer.model.state_dict().items()})
        for i, (a, b) in enumerate(zip(local, got)):
            assert_same(a, b, i)
            assert b["system/staleness_max"] == 0 and b.get("staleness/max", 0) <= 1   # η = 0; 2 mini-batches
        assert digest(sys_.trainer.model) == digest(ctl.trainer.model)
        trained = sum(m["sync/done"] for m in got if "sync/done" in m)
        assert len(sys_.sync_log) == trained and all(e["worker_digests"] == [e["digest"]] for e in sys_.sync_log)
        assert saved[0].keys() >= set(ctl.state_dict())   # the in-process checkpoint's keys, and more
        state, weights = saved
        sys_.trainer.model.load_state_dict(weights)       # what run_train's resume does: weights, then state
        sys_.load_state_dict(state)
        for i in (3, 4):
            assert_same(got[i], sys_.step(), i)
    finally:
        sys_.close()


def test_async_stays_within_eta_under_random_delays(actor_pool, sft_start):
    """Two rollout workers with random delays (0-0.3 s per chunk), η = 1: every step's staleness ≤ η, and the
    second step trains on groups sampled while the first trained (staleness exactly 1: the gate let them run)."""
    from rlpt.systems.runner import RaySystem
    from rlpt.train import build
    job = job_for(sft_start, "system.topology=async", "system.rollout_workers=2", "system.max_staleness=1",
                  "steps=8")
    sys_ = RaySystem(job, build, sft_start[1], actors=actor_pool)
    try:
        ray.get([w.slow_verify.remote(0.0, 0.3, seed=7) for w in sys_.workers])
        rows = [sys_.step() for _ in range(8)]
        sys_.check_syncs()
        assert all(r["system/staleness_max"] <= 1 for r in rows)
        assert rows[0]["system/staleness_max"] == 0 and rows[1]["system/staleness_max"] == 1
        assert all(e["worker_digests"] == [e["digest"]] * 2 for e in sys_.sync_log)
        # a sync whose bytes do not hash to the digest sent with them stops, naming the version
        bad = Payload(99, "0" * 64, ray.put(ray.get(sys_.trainer_actor.weights.remote())))
        with pytest.raises(ray.exceptions.RayTaskError, match="version 99 failed its check"):
            ray.get(sys_.workers[0].apply.remote(bad))
    finally:
        sys_.close()


def test_async_partial_rollouts_mix_versions_within_eta(actor_pool, sft_start):
    """system.partial_rollouts with segments of 4 tokens, two workers, η = 1: syncs land between segments, so
    some trained sequences span two versions; every group's oldest token stays within η, and no token is staler
    than the stalest group (later segments are fresher). Saving drains the chunks in progress segment by segment."""
    from rlpt.systems.runner import RaySystem
    from rlpt.train import build
    job = job_for(sft_start, "system.topology=async", "system.rollout_workers=2", "system.max_staleness=1",
                  "system.partial_rollouts=true", "system.segment_tokens=4", "steps=6")
    sys_ = RaySystem(job, build, sft_start[1], actors=actor_pool)
    try:
        # each unfinished segment pauses 0.3 s, so a chunk outlasts a train step on any machine and a sync lands
        # inside it (without the pause, whether one does depends on the relative speed of sampling and training)
        ray.get([w.slow_segments.remote(0.3) for w in sys_.workers])
        rows = [sys_.step() for _ in range(6)]
        sys_.check_syncs()
        assert all(r["system/staleness_max"] <= 1 and r["system/token_staleness_max"] <= 1 for r in rows)
        assert all(r["system/token_staleness_max"] <= r["system/staleness_max"] for r in rows)
        assert any(r["system/mixed_version_frac"] > 0 for r in rows)
        state = sys_.state_dict()                         # drains the chunks in progress, segment by segment
        assert not sys_._async["inflight"] and "buffer" in state["system"]
    finally:
        sys_.close()


def test_disaggregated_restarts_a_killed_rollout_worker(actor_pool, sft_start):
    """A rollout worker's process dies mid-step (os._exit inside generate): it is restarted from the state copied
    before the step, redraws the same groups, and the run's metrics equal a run without the fault. Last in the
    file: it leaves the pool's worker 1 dead."""
    from rlpt.systems.runner import RaySystem
    from rlpt.train import build
    job = job_for(sft_start, "system.topology=disaggregated", "system.rollout_workers=2", "system.max_restarts=1",
                  "rollout.prompts_per_step=4", "steps=3")
    init = sft_start[1]
    straight = RaySystem(job, build, init, actors=actor_pool)
    rows = [straight.step() for _ in range(3)]
    straight.close()
    faulty = RaySystem(job, build, init, actors=actor_pool)
    try:
        ray.get(faulty.workers[1].crash_on_generate.remote(2))   # dies in step 2
        got = [faulty.step() for _ in range(3)]
        assert [r["system/restarts"] for r in got] == [0.0, 1.0, 1.0]
        assert faulty.workers[1] is not actor_pool[0][1]
        for i, (a, b) in enumerate(zip(rows, got)):
            assert_same(a, b, i)
        assert digest(faulty.trainer.model) == digest(straight.trainer.model)
    finally:
        faulty.close()


def test_one_step_off_and_async_replace_a_killed_rollout_worker(actor_pool, sft_start):
    """one_step_off, then async (η = 1), each with a rollout worker whose process dies mid-run: it is replaced by a
    new actor given the trainer's weights (digest-checked), its share is drawn again, and the run finishes within
    its staleness bound. Last in the file: the pool's worker 1 died in the test before; this one kills worker 0."""
    from rlpt.systems.runner import RaySystem
    from rlpt.train import build
    init, (w0, trainer) = sft_start[1], (actor_pool[0][0], actor_pool[1])
    job = job_for(sft_start, "system.topology=one_step_off", "system.max_restarts=1", "steps=4")
    osoff = RaySystem(job, build, init, actors=([w0], trainer))
    try:
        ray.get(w0.crash_on_generate.remote(3))        # the generation step 2 launches for step 3
        rows = [osoff.step() for _ in range(4)]
        osoff.check_syncs()
        assert rows[-1]["system/restarts"] == 1.0 and osoff.workers[0] is not w0
        assert all(r["system/staleness_max"] <= 1 for r in rows)
        digests = [e["worker_digests"] for e in osoff.sync_log]
        assert [None] in digests                       # the sync queued behind the dead generation
        assert all(d == [e["digest"]] for d, e in zip(digests, osoff.sync_log) if d != [None])
        replacement = osoff.workers[0]
        osoff._spawned.remove(replacement)             # kept alive for the async half
    finally:
        osoff.close()
    job = job_for(sft_start, "system.topology=async", "system.max_staleness=1", "system.max_restarts=1", "steps=4")
    asy = RaySystem(job, build, init, actors=([replacement], trainer))
    try:
        ray.get(replacement.crash_on_generate.remote(2))   # the chunk admitted while step 1 trains
        rows = [asy.step() for _ in range(4)]
        asy.check_syncs()
        assert rows[-1]["system/restarts"] == 1.0 and asy.workers[0] is not replacement
        assert all(r["system/staleness_max"] <= 1 for r in rows)
    finally:
        asy.close()
