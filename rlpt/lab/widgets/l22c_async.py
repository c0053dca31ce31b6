"""Lesson 22c · "Async topology throughput & staleness": RoleTimes.step, trainer_idle, async_clip_fraction.

    colocated R+T+S;  disaggregated max(R, T) + S;  async max(R, T, S);  clip ≈ 1 − exp(−Δ/20)
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "Async topology throughput & staleness"
SOURCE = ["rlpt.perf.throughput:RoleTimes.step", "rlpt.perf.throughput:async_clip_fraction",
          "rlpt.perf.throughput:trainer_idle"]
NOTES = [("course", "Defaults (disaggregated, τ_R 20, τ_T 8, τ_S 3): colocated 31 s, disaggregated 23 s, async 20 s. "
                    "Clip fraction 1 − exp(−Δ/20): Δ=8 → 33%, the freshness wall."),
         ("fix", "The course shows trainer idle time for async too although its model lets the trainer consume no "
                 "extra batches; and its clip fraction is a fitted curve, not a measurement: instrument it "
                 "(rlpt logs clip/frac per step).")]


class Knobs(BaseModel):
    topology: Literal["colocated", "disaggregated", "async"] = Field("disaggregated", description="topology")
    rollout: float = Field(20, ge=2, le=40, description="τ_R (s)")
    train: float = Field(8, ge=2, le=20, description="τ_T (s)")
    sync: float = Field(3, ge=0, le=10, description="τ_S (s)")
    staleness: int = Field(2, ge=0, le=12, description="Δ (steps)")


def compute(k: Knobs) -> dict:
    from rlpt.perf.throughput import RoleTimes, async_clip_fraction, trainer_idle
    t = RoleTimes(rollout=k.rollout, train=k.train, sync=k.sync)
    step = t.step(k.topology)
    return {"step_s": step, "speedup": t.step("colocated") / step, "idle": trainer_idle(t, k.topology),
            "clip": async_clip_fraction(k.staleness) if k.topology == "async" else 0.0,
            "per_topology": {top: t.step(top) for top in ("colocated", "disaggregated", "async")},
            "clip_curve": [(d, async_clip_fraction(d)) for d in range(13)]}


def render(r: dict) -> str:
    k = svg.kpis([("τ_step", f'{r["step_s"]:.1f} s'), ("tok/s vs colocated", f'{r["speedup"]:.2f}×'),
                  ("trainer idle", f'{100 * r["idle"]:.0f}%'), ("clip fraction", f'{100 * r["clip"]:.1f}%')])
    return (k + svg.table(["topology", "τ_step (s)"], [[t, s] for t, s in r["per_topology"].items()])
            + svg.line_chart({"clip fraction": r["clip_curve"]}, "staleness Δ", "clip fraction",
                             "clip fraction vs staleness", marks=[(8, "freshness wall")]))
