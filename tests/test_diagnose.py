"""`rlpt diagnose` and the per-step metrics it reads (trainer: ρ quantiles and histogram, grad-norm max,
non-finite steps; controller: length quantiles, groups with signal, peak memory per role).

Findings on real runs: the slow tests train tiny gpt_mini runs (one SFT start, then a healthy run, a run with
sync.every=8 and a run with a far too high lr). Two findings need more steps than a test can afford, so their
tests read a real run's metrics.jsonl and config.yaml recorded once into tests/data/diagnose/ (2 Dec 2026):
  hack/      `rlpt train recipes/hack_arith.yaml run.threads=1 steps=60 eval.size=100 eval.every=10`
             (examples/reward_hacking.py's setting, half its steps)
  collapse/  `rlpt train recipes/grpo_arith.yaml init_from=<hack's SFT start> rollout.prompts_per_step=16 steps=40
             eval.size=100 eval.every=10 trainer.optim.lr=3e-3 trainer.optim.schedule=constant` (60× the recipe's lr)
"""
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlpt.framework.controller import length_quantiles
from rlpt.framework.trainer import RATIO_BINS, Trainer, ratio_stats
from rlpt.framework.trajectory import Trajectory, collate
from rlpt.perf import diagnose as dg
from rlpt.perf.configs import run_config

from conftest import TINY_RL, TOK, tiny_gpt

DATA = Path(__file__).parent / "data" / "diagnose"


def names(findings, severity=None):
    return {f.name for f in findings if severity is None or f.severity == severity}


def recorded(name):
    d = DATA / name
    return dg.diagnose(dg.read_metrics(d), run_config(d))


# -- findings on the recorded runs --------------------------------------------------------------------------
def test_reward_hacking_run_is_flagged():
    found = recorded("hack")
    hack = next(f for f in found if f.name == "reward hacking")
    assert hack.severity == "severe" and found[0] is hack
    # the evidence quotes the run: leaky train reward up, honest held-out down, and the verifier/honest gap
    assert "acc/heldout_honest" in hack.evidence and "0.230 → 0.025" in hack.evidence
    assert "reward/mean − acc/train" in hack.evidence
    assert "lesson 18" in hack.lesson
    assert "length drift" in names(found)            # the hack writes longer chains: 15.9 → 29.0 tokens
    assert "entropy collapse" not in names(found)


def test_lr_too_high_run_collapses_entropy():
    found = recorded("collapse")
    f = next(f for f in found if f.name == "entropy collapse")
    assert f.severity == "severe" and "×0.27" in f.evidence
    assert "reward hacking" not in names(found) and "stale sync" not in names(found)


# -- the rules, on hand-made rows -----------------------------------------------------------------------------
def test_staleness_counts_train_steps_since_the_last_sync():
    rows = [{"step": s, "sync/done": float(s % 3 == 0), "ratio/abs_log_mean": 0.01 * s} for s in range(1, 7)]
    rows.insert(2, {"step": 2.5, "step/skipped": 1.0})   # a skipped step trains nothing and does not age weights
    assert [(s, age) for s, age, _ in dg.staleness(rows)] == [(1, 0), (2, 1), (3, 2), (4, 0), (5, 1), (6, 2)]


def test_stale_sync_against_ratio_drift():
    def run(every, logr):
        rows = [{"step": i + 1, "sync/done": float((i + 1) % every == 0), "ratio/abs_log_mean": x, "clip/frac": 0.0}
                for i, x in enumerate(logr)]
        return dg.stale_sync(rows, {"sync": {"every": every}})
    stale = run(4, [0.01, 0.06, 0.09, 0.12] * 3)          # grows with the weights' age, resets at each sync
    assert stale.name == "stale sync" and stale.severity == "severe" and "sync.every=4" in stale.evidence
    drift = run(1, [0.08] * 6)                            # fresh every step, still far from ρ = 1
    assert drift.name == "ratio drift" and drift.severity == "warning"
    assert run(1, [0.01] * 6) is None


def test_nan_risk_kl_spike_dpo_displacement_and_empty_groups():
    rows = [{"step": 1, "step/nonfinite": 1.0, "ratio/p05": 0.9, "ratio/p95": 1.1}]
    assert dg.nan_risk(rows, {}).severity == "severe"
    rows = [{"step": 1, "ratio/p05": 0.1, "ratio/p95": 5.0}]
    assert "first trained step" in dg.nan_risk(rows, {}).evidence
    assert dg.nan_risk([{"step": 1, "ratio/p05": 0.9, "ratio/p95": 1.1}], {}) is None
    kl = [{"step": i, "kl/mean": 0.01} for i in range(8)] + [{"step": 8, "kl/mean": 0.2}]
    assert "step 8" in dg.kl_spike(kl, {}).evidence
    assert dg.kl_spike(kl[:-1], {}) is None
    dpo = [{"step": i, "logp/chosen": -10 - i, "logp/rejected": -12 - 2 * i} for i in range(6)]
    assert dg.dpo_displacement(dpo, {}).name == "DPO likelihood displacement"
    dpo_ok = [{"step": i, "logp/chosen": -10 + i, "logp/rejected": -12 - 2 * i} for i in range(6)]
    assert dg.dpo_displacement(dpo_ok, {}) is None
    easy = [{"step": i, "groups/signal_frac": 0.1, "reward/mean": 0.95} for i in range(4)]
    assert "too easy" in dg.empty_groups(easy, {}).evidence


def test_time_shares_feed_the_allocator():
    rows = [{"step": i, "time/rollout": 6.0, "time/verify": 0.0, "time/ref": 1.0, "time/train": 2.0,
             "time/sync": 1.0} for i in range(3)]
    f = dg.time_shares(rows, {})
    assert f.severity == "info" and "rollout 60%" in f.evidence and "rollout-bound" in f.evidence
    assert "prefix caching (−3.6 s)" in f.evidence        # 6 s × (1 − 0.4), lesson 28's multiplier
    # the first step (engine start-up) is left out; a skipped step (no time/train) still counts for the rollout
    rows = [{"step": 0, "time/rollout": 60.0, "time/train": 9.0}, {"step": 1, "time/rollout": 2.0},
            {"step": 2, "time/rollout": 4.0, "time/train": 1.0}, {"step": 3, "time/rollout": 3.0, "time/train": 1.0}]
    t = dg.role_times(rows)
    assert (t.rollout, t.train) == (3.0, 1.0)


def test_report_section_is_written_once(tmp_path):
    run = tmp_path / "hack"
    shutil.copytree(DATA / "hack", run)
    (run / "report.md").write_text("# RL (grpo): hack\n\nthe job's table\n")
    rows = dg.read_metrics(run)
    found = dg.diagnose(rows, run_config(run))
    dg.write_into_report(run, rows, found)
    report = dg.write_into_report(run, rows, found).read_text()
    assert report.startswith("# RL (grpo): hack\n\nthe job's table") and report.count("## Diagnosis") == 1
    assert "**SEVERE: reward hacking.**" in report
    assert (run / "diagnose_time_shares.png").is_file() and (run / "diagnose_0.png").is_file()


def test_cli_diagnose(tmp_path, capsys):
    import argparse

    from rlpt.config import ConfigError
    from rlpt.perf.cli import add_commands
    run = tmp_path / "collapse"
    shutil.copytree(DATA / "collapse", run)
    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command"))
    args = p.parse_args(["diagnose", str(run), "--no-report"])
    assert args.fn(args) == 0
    assert "SEVERE: entropy collapse" in capsys.readouterr().out and not (run / "report.md").exists()
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        dg.read_metrics(tmp_path)
    args = p.parse_args(["perf", "throughput", str(run)])          # the run's measured split and the allocator
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert "| time/train " in out and "lesson 28's allocator on this split" in out
    args = p.parse_args(["perf", "memory", "--model", str(run)])    # the model from config.yaml, its mem/ measured
    assert args.fn(args) == 0
    assert "measured mem/train_gb (median)" in capsys.readouterr().out
    args = p.parse_args(["perf", "throughput", str(run)])
    (run / "metrics.jsonl").write_text('{"step": 1, "loss/sft": 1.0}\n')
    with pytest.raises(ConfigError, match="logged no time/train"):
        args.fn(args)


# -- the per-step metrics ------------------------------------------------------------------------------------
def test_ratio_stats_exact():
    log_r = torch.tensor([-2.0, -0.2, -0.05, 0.0, 0.0, 0.02, 0.05, 0.5, 1.5, 0.0])
    s = ratio_stats(log_r)
    assert s["ratio/p50"] == 1.0 and s["ratio/max"] == pytest.approx(math.exp(1.5))
    assert len(s["ratio/hist"]) == len(RATIO_BINS) + 1 and sum(s["ratio/hist"]) == 10
    # bins: <-1 | -1..-.3 | -.3..-.1 | -.1..-.03 | -.03..-.01 | -.01..01 | .01..03 | .03..1 | .1..3 | .3..1 | >1
    assert s["ratio/hist"] == [1, 0, 1, 1, 0, 3, 1, 1, 0, 1, 1]
    assert ratio_stats(torch.tensor([])) == {}


def test_length_quantiles_exact():
    assert length_quantiles(list(range(1, 11))) == {"len/p10": 2.0, "len/p50": 6.0, "len/p90": 10.0,
                                                    "len/max": 10.0}


def _batch():
    trajs = [Trajectory([1, 2, 3], [4, 5], torch.ones(2), torch.full((2,), -1.0), reward=1.0, advantage=1.0),
             Trajectory([1, 2], [6, 7, 8], torch.ones(3), torch.full((3,), -1.0), reward=0.0, advantage=-1.0)]
    for t in trajs:
        t.ref_logp = torch.zeros(len(t.response_ids))
    return collate(trajs, TOK.pad_id)


def test_nonfinite_loss_skips_the_optimizer_step():
    model = tiny_gpt()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = Trainer(model, opt, None, 1.0, 0, mini_batches=2)

    def nan_loss(batch, new_logp):
        return new_logp.sum() * float("nan"), {}
    m = trainer.train_step(_batch(), nan_loss)
    assert m["step/nonfinite"] == 2 and m["train/optimizer_steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state                                  # AdamW's moments never saw the NaN

    def fine(batch, new_logp):
        return -(new_logp * batch.mask).sum(), {}
    m = trainer.train_step(_batch(), fine)
    assert m["step/nonfinite"] == 0 and m["train/optimizer_steps"] == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # ρ against old_logp = −1 per token: the quantiles and histogram cover every trained token of both updates
    assert sum(m["ratio/hist"]) == 5 and m["ratio/p05"] <= m["ratio/p50"] <= m["ratio/p95"]
    assert m["grad/norm_max"] >= m["grad/norm"]


PROBE = """
from rlpt.perf.probe import PeakMemory
with PeakMemory() as big:
    block = b"x" * (64 << 20)
del block
with PeakMemory() as small:
    block = b"x" * (16 << 20)
del block
print(big.source, small.source, big.peak_bytes - big.start_bytes, small.peak_bytes - small.start_bytes)
"""


def test_peak_memory_probe_on_cpu():
    """The peak of each block, not of the process so far: a 64 MiB block, then a 16 MiB one after it was freed.
    In a fresh process (no torch): in the test process, a block can land in heap pages freed earlier that are
    still resident, and then the RSS it measures does not move (seen in the full suite)."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    big_src, small_src, big, small = out[0], out[1], int(out[2]), int(out[3])
    assert big_src == small_src == "vmhwm"                # Linux; a GPU run reports "cuda"
    assert big >= 63 << 20
    assert 15 << 20 <= small < 32 << 20


# -- live tiny runs -------------------------------------------------------------------------------------------
# One direct-answer SFT start on 2-operand sums of 0..3 (60 steps: right ~15 % of the time, so GRPO groups are
# mixed), then 8–12 RL steps each. The healthy run uses lr 3e-4: with TINY_RL's 1e-3 one update already moves
# |log ρ| past lesson 22c's 0.05.
LIVE = [*TINY_RL, "sft.format=direct", "sft.steps=60", "sft.batch_size=32", "task.max_operands=2", "task.max_value=3",
        "rollout.max_tokens=6", "eval.size=16"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from rlpt.train import load_train_job, run_train, sft_init
    out = tmp_path_factory.mktemp("diagnose_runs")
    init = sft_init(load_train_job(None, [*LIVE, f"run.out_dir={out}", "run.name=start"]), False)

    def run(name, *overrides):
        job = load_train_job(None, [*LIVE, f"run.out_dir={out}", f"run.name={name}", f"init_from={init}", *overrides])
        _, r, _ = run_train(job)
        return dg.diagnose(r.read_metrics(), run_config(r.dir)), r.read_metrics()
    return run


@pytest.mark.slow
def test_healthy_grpo_run_has_nothing_severe(live):
    found, rows = live("healthy", "steps=8", "eval.every=8", "trainer.optim.lr=3e-4")
    assert not names(found, "severe"), dg.render(found)
    assert "time shares" in names(found)
    trained = [r for r in rows if "ratio/hist" in r]
    assert trained and all(r["step/nonfinite"] == 0 and "len/p90" in r and "mem/train_gb" in r for r in trained)


@pytest.mark.slow
def test_sync_every_8_is_flagged_stale(live):
    # lr 1e-3 and 24 steps (three sync cycles): flagged at seeds 0-8 here; at lr 3e-4 or 12 steps one seed in
    # five or six was not (too few fresh batches, or too little drift), so another CPU's trajectory could miss
    found, rows = live("stale", "steps=24", "sync.every=8", "eval.every=24", "trainer.optim.lr=1e-3")
    f = next(f for f in found if f.name == "stale sync")
    assert f.severity == "severe" and "sync.every=8" in f.evidence


@pytest.mark.slow
def test_far_too_high_lr_is_flagged(live):
    """The live partner of the recorded collapse run: 8 steps at lr 0.03 do not yet collapse the entropy of this
    tiny policy, but the ratio already explodes; the diagnosis blames the lr (ratio drift), not the sync."""
    found, _ = live("lr_high", "steps=8", "eval.every=8", "trainer.optim.lr=0.03")
    # seeds 0-8 here: NaN risk severe every time, ratio drift severe at 6 and a warning at 3, stale sync never
    assert "NaN risk" in names(found, "severe") and "ratio drift" in names(found) and "stale sync" not in names(found)
