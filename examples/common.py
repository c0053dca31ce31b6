"""What the examples share: run a job unless its folder already holds the finished run, read metrics back.

    python examples/tool_use.py          tool use vs no tool on 3-digit addition       -> docs/tool_use.md
    python examples/reward_hacking.py    GRPO on a leaky verifier                       -> docs/reward_hacking.md
    python examples/rlhf.py recipes/rlhf_arith.yaml   hidden human -> RM -> PPO over β  -> docs/rlhf.md

The examples are repository scripts, not part of the `rlpt` package: each drives the ordinary jobs
(`rlpt.sft.train_sft`, `rlpt.preference.reward_model.train_rm`, `rlpt.train.run_train`), each into its own
run folder, and writes a results page under docs/. A job whose folder holds the finished run is reused, one
interrupted (Ctrl-C, a crash) is continued with the job's own `--resume`, so rerunning an example redoes
only what is missing. Each takes `key=value` overrides (applied to every run it makes) and `--report-only`
to rewrite its page from run folders that already exist. Nothing on a page is typed in by hand: every
number is read from the runs' metrics.jsonl.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from rlpt.checkpoint import finished_checkpoint, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def run_stage(name: str, run_dir: Path, steps: int, train: Callable[[bool], object]) -> Path:
    """`train(resume)` into `run_dir` unless it already holds a checkpoint at `steps`; -> its latest checkpoint.

    A folder with a checkpoint short of `steps` is continued (`resume=True`): bit-identical to a run that
    never stopped. Note the reuse is by step count only: change a stage's other settings and give it a new
    run folder (run.out_dir or run.name), or delete the old one."""
    if finished_checkpoint(run_dir, steps) is None:
        resume = latest_checkpoint(run_dir) is not None
        print(f"[examples] {name}: {'resuming' if resume else 'training'} {run_dir}", flush=True)
        train(resume)
    else:
        print(f"[examples] {name}: reusing the finished run in {run_dir}", flush=True)
    return latest_checkpoint(run_dir)


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics at {str(path)!r}: run the example without --report-only first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def mean_last(rows: list[dict], key: str, n: int = 10) -> float | None:
    vals = [v for _, v in series(rows, key)][-n:]
    return sum(vals) / len(vals) if vals else None


def f3(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def split_args(argv: list[str]) -> tuple[list[str], bool]:
    """-> (key=value overrides, report_only)."""
    report_only = "--report-only" in argv
    rest = [a for a in argv if a != "--report-only"]
    bad = [a for a in rest if "=" not in a]
    if bad:
        sys.exit(f"unexpected argument(s) {bad}: give key=value overrides and optionally --report-only")
    return rest, report_only
