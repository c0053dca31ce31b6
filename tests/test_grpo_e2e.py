"""End to end: GRPO lifts a deliberately imperfect SFT start on the default task (issue 3).

The recipe (recipes/grpo_arith.yaml) trains its own SFT start first (chain of thought, 180 steps:
0.52 held-out greedy accuracy on 400 problems, pass@4 0.78), then runs 300 GRPO steps, sampling with
the inference engine (the default rollout backend). Measured on this machine (2 CPU cores, 1 thread,
seed 0): 0.52 -> 0.675 after 25 steps, 0.725 after 150, 0.7625 after 300: +24 points, 5 min 4 s in all
(docs/grpo_arith.md). The issue's target is +20 points or >= 90 %; this test asserts it, within 10
minutes (SFT included).
"""
import time

import pytest

from rlpt.report import write_report
from rlpt.train import load_train_job, run_train


@pytest.mark.slow
def test_grpo_raises_heldout_accuracy(tmp_path):
    job = load_train_job("recipes/grpo_arith.yaml", [f"run.out_dir={tmp_path}", "run.progress=false"])
    t0 = time.perf_counter()
    ctl, run, final = run_train(job)
    elapsed = time.perf_counter() - t0
    report = write_report(run, "GRPO", final, plots={"heldout_accuracy_and_reward": ["acc/heldout", "reward/mean"]})
    start, end = final["acc/heldout_start"], final["acc/heldout_final"]
    print(f"GRPO: held-out {start:.3f} -> {end:.3f} (best {final['acc/heldout_best']:.3f}) in {elapsed:.0f} s")
    assert start < 0.85, "the SFT start should be imperfect"
    assert end >= start + 0.20 or end >= 0.90, \
        f"GRPO gain {end - start:+.3f} from {start:.3f}: the target is +0.20 or 0.90"
    assert elapsed < 600
    assert (run.dir / "heldout_accuracy_and_reward.png").exists() and "png" in report.read_text()
