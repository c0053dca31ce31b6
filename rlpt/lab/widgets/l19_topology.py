"""Lesson 19 · "Throughput simulator": colocated vs disaggregated vs async, rlpt.perf.throughput.RoleTimes.step.

    colocated R + T + S;  disaggregated max(R, T) + S;  async max(R, T, S);  steps/h = 3600 / τ_step
"""
from __future__ import annotations

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "Throughput simulator: pick R, T, sync"
SOURCE = ["rlpt.perf.throughput:RoleTimes.step"]
NOTES = [("course", "Defaults (R 20 s, T 15 s, sync 2 s): 97 / 164 / 180 steps per hour for colocated / "
                    "disaggregated / async; async 1.85× colocated."),
         ("fix", "The widget has no off-policy penalty, so async always 'wins'; the lesson itself warns async often "
                 "loses on steps-to-target (lesson 22c's clip fraction). It also charges colocated the sync S, "
                 "although the prose calls colocated sync a pointer swap; rlpt's RoleTimes keeps the widget's "
                 "charge and says so."),
         ("course", "rlpt runs the colocated topology in-process today; the Ray executors (rlpt/systems/) are an "
                    "open issue.")]


class Knobs(BaseModel):
    rollout: float = Field(20, ge=1, le=60, description="R (rollout s)")
    train: float = Field(15, ge=1, le=60, description="T (train s)")
    sync: float = Field(2, ge=0, le=20, description="sync (s)")


def compute(k: Knobs) -> dict:
    from rlpt.perf.throughput import TOPOLOGIES, RoleTimes
    t = RoleTimes(rollout=k.rollout, train=k.train, sync=k.sync)
    steps = {top: t.step(top) for top in TOPOLOGIES}
    return {"step_s": steps, "steps_per_hour": {top: 3600 / s for top, s in steps.items()},
            "async_vs_colocated": steps["colocated"] / steps["async"]}


def render(r: dict) -> str:
    sph = r["steps_per_hour"]
    k = svg.kpis([(f"{t} steps/h", f"{v:.0f}") for t, v in sph.items()]
                 + [("async vs colocated", f'{r["async_vs_colocated"]:.2f}×')])
    return k + svg.bar_chart(list(sph), {"steps/h": list(sph.values())}, "steps per hour", "steps per hour")
