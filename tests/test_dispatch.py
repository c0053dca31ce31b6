"""The verifier dispatcher (rlpt/framework/dispatch.py, lesson 28) and the run report's timeline.

Verdicts come back keyed to their samples whatever order the workers finish in (delays drawn at random so they
do finish out of order), a rollout verified in the pool equals the inline one, the engine hands each sequence over
the step it finishes, and a verify past `rollout.verify_timeout` is reward 0 and counted, never a hang: stopped in
its worker (soft), or its worker killed and replaced (hard). A worker that dies mid-verify is replaced too.
Then the report: every topology's rows (colocated, Ray, with the verify lane) give a timeline section.

Budget: the first pool of a pytest process starts the fork server (it imports torch and rlpt: ~2 s on a quiet
machine, more on a loaded one); each pool after it forks in milliseconds. The rest is well under 1 s a test.
"""
from __future__ import annotations

import json
import random
import threading
import time

import pytest
from dispatch_envs import DelayedArithmetic, ScriptedEnv

from rlpt.engine.llm import LLM
from rlpt.engine.sampling import SamplingParams as EngineParams
from rlpt.framework.agent_loop import MultiTurnRollout
from rlpt.framework.dispatch import VerifierPool
from rlpt.framework.environment import Prompt
from rlpt.framework.rollout import Rollout
from rlpt.gpt_mini.generate import SamplingParams

from conftest import TINY_RL, TOK, tiny_gpt


@pytest.fixture(scope="module")
def pool():
    p = VerifierPool(ScriptedEnv(), workers=3, timeout=0.6, grace=0.4)
    yield p
    p.close()


def _prompt(i: int) -> Prompt:
    return Prompt(f"p{i}", [1], i)


def test_verdicts_are_keyed_to_their_samples_whatever_order_they_finish_in(pool):
    rng = random.Random(0)
    delays = [rng.uniform(0.0, 0.15) for _ in range(12)]
    delays[0] = 0.5                                   # the first submitted is surely not the first finished
    keys = [("draw", i) for i in range(12)]
    for i, (k, d) in enumerate(zip(keys, delays)):
        pool.submit(k, _prompt(i), f"sleep {d:.3f} {i / 10}")
    got = pool.gather(reversed(keys))
    assert [got[k].reward for k in keys] == [i / 10 for i in range(12)]
    assert [got[k].info["prompt"] for k in keys] == [f"p{i}" for i in range(12)]
    finish_order = sorted(range(12), key=lambda i: got[keys[i]].info["done"])
    assert finish_order != list(range(12)) and finish_order[0] != 0
    assert len({got[k].info["pid"] for k in keys}) == 3        # all three workers took part
    s = pool.take_stats()
    assert (s["verify/count"], s["verify/timeouts"], s["verify/restarts"]) == (12, 0, 0)
    assert s["verify/busy"] >= sum(delays) and s["t_last"] > s["t_first"]
    with pytest.raises(KeyError, match="never submitted"):
        pool.gather([("draw", 0)])                    # gathered once: gone


def test_a_verify_past_the_timeout_scores_zero_in_its_worker_and_the_worker_lives_on(pool):
    pool.take_stats()
    t0 = time.perf_counter()
    pool.submit("slow", _prompt(0), "sleep 30 1.0")
    v = pool.gather(["slow"])["slow"]
    assert v.reward == 0.0 and v.info["verify_timeout"] and "stopped in the worker" in v.info["verify_error"]
    assert 0.6 <= time.perf_counter() - t0 < 5
    pids = set(pool.pids)
    pool.submit("next", _prompt(1), "sleep 0 1.0")
    assert pool.gather(["next"])["next"].reward == 1.0
    s = pool.take_stats()
    assert (s["verify/timeouts"], s["verify/restarts"]) == (1, 0) and set(pool.pids) == pids


def test_a_verify_deaf_to_the_timeout_has_its_worker_killed_and_replaced(pool):
    pool.take_stats()
    pids = set(pool.pids)
    t0 = time.perf_counter()
    pool.submit("hang", _prompt(0), "hang")
    v = pool.gather(["hang"])["hang"]
    assert v.reward == 0.0 and "worker killed" in v.info["verify_error"]
    assert 1.0 <= time.perf_counter() - t0 < 10          # timeout 0.6 + grace 0.4
    s = pool.take_stats()
    assert (s["verify/timeouts"], s["verify/restarts"]) == (1, 1)
    assert len(set(pool.pids) - pids) == 1               # one new worker
    for i in range(3):
        pool.submit(i, _prompt(i), "sleep 0 0.5")
    assert [v.reward for v in pool.gather(range(3)).values()] == [0.5] * 3


def test_a_worker_that_dies_or_a_verifier_that_raises_scores_zero(pool):
    pool.take_stats()
    pool.submit("die", _prompt(0), "die")
    pool.submit("raise", _prompt(1), "raise")
    got = pool.gather(["die", "raise"])
    assert got["die"].reward == 0.0 and "exit code 3" in got["die"].info["verify_error"]
    assert got["raise"].reward == 0.0 and got["raise"].info["verify_error"] == \
        "RuntimeError: the verifier failed on this response"        # as safe_verify inline
    s = pool.take_stats()
    assert (s["verify/timeouts"], s["verify/restarts"]) == (0, 1)
    pool.submit("after", _prompt(2), "sleep 0 1.0")
    assert pool.gather(["after"])["after"].reward == 1.0


def test_bad_input_is_refused_with_the_key_to_fix():
    with pytest.raises(ValueError, match=r"rollout.verify_workers=2: the env .* cannot be copied"):
        VerifierPool(type("Local", (), {"lock": threading.Lock()})(), workers=2)
    with pytest.raises(ValueError, match="rollout.verify_timeout must be > 0"):
        VerifierPool(ScriptedEnv(), workers=1, timeout=0)
    with pytest.raises(ValueError, match="verifies turn by turn"):
        MultiTurnRollout(tiny_gpt(0), TOK, 2, SamplingParams(max_tokens=4)).use_verifier(2)


def test_llm_hands_each_sequence_over_the_step_it_finishes():
    llm = LLM(tiny_gpt(0), eos_id=TOK.eos_id)
    seen = []
    params = [EngineParams(n=3, temperature=1.0, max_tokens=m, seed=0) for m in (12, 4)]   # two finishing times
    outs = llm.generate([[1, 2, 3], [4, 5]], params,
                        on_finish=lambda i, j, c: seen.append((i, j, llm.stats["engine/steps"], c.token_ids)))
    assert sorted((i, j, ids) for i, j, _, ids in seen) == \
        sorted((i, c.index, c.token_ids) for i, o in enumerate(outs) for c in o.outputs)      # each once, as returned
    steps = [s for *_, s, _ in seen]
    assert steps == sorted(steps) and steps[0] < steps[-1]      # in the order they finished, not all at the end
    assert all(len(ids) <= s for _, _, s, ids in seen)         # one token per step at most


@pytest.mark.parametrize("backend", ["engine", "simple"])
def test_a_rollout_verified_in_the_pool_equals_the_inline_one(backend):
    def run(workers: int):
        r = Rollout(tiny_gpt(0, std=0.3), TOK, 4, SamplingParams(max_tokens=12, temperature=1.0), seed=3,
                    batch_limit=2, backend=backend)
        r.use_verifier(workers, timeout=5)
        env = DelayedArithmetic(seed=1)
        groups, first = [r.generate(env, 3)], dict(r.stats)
        groups.append(r.generate(env, 3))
        stats = dict(r.stats)
        r.close()
        return [(t.reward, t.response_ids, t.old_logp.tolist(), t.info) for g in groups for gr in g for t in gr], \
            stats, first

    inline, s0, _ = run(0)
    pooled, s2, first = run(2)
    assert first["verify/t0"] > first["verify/pool_start_s"] > 0      # the lane's clock starts before the pool does
    assert pooled == inline and "verify/t0" not in s0
    assert s2["verify/count"] == 12 and s2["verify/timeouts"] == 0
    # the first verdict was handed out while later waves (batch_limit 2: six sequences at a time) still sampled
    assert 0 <= s2["verify/t0"] < s2["time/generate"] <= s2["verify/t1"]


# -- the run report's timeline ------------------------------------------------------------------------------------
class _Run:
    """What write_report reads of a finished run: its folder and its metrics rows."""

    def __init__(self, folder, rows):
        self.dir, self.rows = folder, rows

    def read_metrics(self):
        return self.rows


COLOCATED = {"time/rollout": 1.0, "time/verify": 0.5, "time/ref": 0.25, "time/train": 2.0, "time/sync": 0.25}


@pytest.mark.parametrize("topology", ["colocated", "dispatched", "ray"])
def test_the_report_holds_the_timeline_for_every_topology(tmp_path, topology):
    from rlpt.perf.timeline import Span, spans
    from rlpt.report import write_report
    if topology == "colocated":
        row = dict(COLOCATED)
    elif topology == "dispatched":   # the pool verified from 0.2 s to 1.1 s; the step waited 0.1 s after sampling
        row = {**COLOCATED, "time/verify": 0.1, "verify/t0": 0.2, "verify/t1": 1.1, "verify/busy": 1.6,
               "verify/timeouts": 1.0}
    else:
        row = {"time/train": 1.0, "time/step": 2.0, "time/rollout": 1.2, "time/verify": 0.1, "verify/t0": 0.3,
               "verify/t1": 1.4, "timeline/rollout0_t0": 0.1, "timeline/rollout0_t1": 1.5,
               "timeline/train_t0": 0.2, "timeline/train_t1": 1.2, "timeline/sync_t0": 1.5, "timeline/sync_t1": 1.6}
    rows = [{"step": 0, "acc/heldout": 0.5}] + [{"step": s, **row} for s in (1, 2)]
    first = [s for s in spans(rows) if s.step == 1]
    if topology == "dispatched":
        assert first == [Span(1, "rollout", 0.0, 1.0), Span(1, "verify", 0.2, 1.1), Span(1, "ref", 1.1, 1.35),
                         Span(1, "train", 1.35, 3.35), Span(1, "sync", 3.35, 3.6)]
    if topology == "ray":
        assert Span(1, "verify", 0.4, 1.5) in first      # from the first rollout worker's start
    path = write_report(_Run(tmp_path, rows), "RL (grpo)", {"acc/heldout_final": 0.5}, plots={})
    text = path.read_text()
    assert "## Timeline: the last 2 steps" in text and "![timeline](timeline.png)" in text
    assert (tmp_path / "timeline.png").stat().st_size > 0
    assert "equation, colocated (sum of terms)" in text and "equation, overlapped (max of sides)" in text
    if topology == "colocated":
        assert "| verify " in text and "1 s busy (12% of 8 s)" in text     # 2 × 0.5 s of 2 steps of 4 s
        assert [ln.split("|")[2].strip() for ln in text.splitlines() if ln.startswith("| equation")] == ["4 s", "2.5 s"]
    if topology == "dispatched":
        assert "| verify pool, median worker-seconds per step" in text and "| verify timeouts (reward 0), whole run" \
            in text and "1.6 s" in text
    if topology == "ray":
        assert "| rollout0 " in text and "| verify " in text


def test_a_run_without_role_times_gets_no_timeline(tmp_path):
    from rlpt.report import write_report
    rows = [{"step": s, "loss/sft": 1.0 / (s + 1)} for s in range(3)]
    text = write_report(_Run(tmp_path, rows), "SFT", {"loss": 0.3}, plots={}).read_text()
    assert "Timeline" not in text and not (tmp_path / "timeline.png").exists()



@pytest.mark.slow
def test_rlpt_train_with_a_verifier_pool_trains_as_inline_and_reports_the_verify_lane(tmp_path):
    """End to end: `rlpt train rollout.verify_workers=2` logs the same rewards and losses as the inline run (same
    seeds: verdicts keyed to their samples), and its report's timeline has the verify lane."""
    from rlpt.cli import main
    out, common = tmp_path / "runs", [*TINY_RL, "steps=3", "eval.every=3"]
    assert main(["train", *common, f"run.out_dir={out}", "run.name=inline"]) == 0
    sft = out / "inline" / "sft"
    assert main(["train", *common, f"run.out_dir={out}", "run.name=pool", f"init_from={sft}",
                 "rollout.verify_workers=2", "rollout.verify_timeout=10"]) == 0

    def rows(name):
        return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    inline, pool = [r for r in rows("inline") if "reward/mean" in r], [r for r in rows("pool") if "reward/mean" in r]
    assert [(r["reward/mean"], r.get("loss")) for r in pool] == [(r["reward/mean"], r.get("loss")) for r in inline]
    assert all(r["verify/count"] == 16 and r["verify/timeouts"] == 0 for r in pool)   # 4 prompts x 4 samples
    assert all("verify/count" not in r for r in inline)
    report = (out / "pool" / "report.md").read_text()
    assert "## Timeline" in report and "| verify " in report and "verify pool, median worker-seconds" in report
