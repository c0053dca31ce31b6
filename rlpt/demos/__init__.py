"""Demos that run real `rlpt train` jobs and write a results page under docs/ (table, plot, command).

    python -m rlpt.demos.tool_use          tool use vs no tool on 3-digit addition   -> docs/tool_use.md
    python -m rlpt.demos.reward_hacking    GRPO on a leaky verifier                  -> docs/reward_hacking.md

Each takes `key=value` overrides (applied to every run it makes) and `--report-only` to rewrite the page
from run folders that already exist. Nothing on a page is typed in by hand: every number is read
from the runs' metrics.jsonl.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics at {str(path)!r}: run the demo without --report-only first")
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
