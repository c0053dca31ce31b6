"""Lesson 22a · "Per-role wall-clock model": rlpt.perf.throughput.role_widget and RoleTimes.step.

    τ_R = 21 s·(P/7)·tokens/1M·tail/4,  τ_T = 8 s·(P/7)·tokens/1M/4,  τ_ref = τ_T/3,  τ_S = 0.15P + 0.005P²
    colocated: sum;  disaggregated: max(R+V, ref+T) + S;  async: max(R+V, ref+T, S)
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "Per-role wall-clock model"
SOURCE = ["rlpt.perf.throughput:role_widget", "rlpt.perf.throughput:RoleTimes.step"]
NOTES = [("course", "Defaults (7B, K=16, L=1024, disaggregated, 64 prompts): τ_R ≈ 10.1 s, τ_T ≈ 2.1 s, "
                    "τ_step ≈ 12.4 s, ≈85k tok/s, rollout 81% of the step. L=8192 pushes rollout past 90%."),
         ("fix", "The widget's calibration (21 s decode, 8 s train per 1M tokens) already assumes 4 GPUs, yet its "
                 "code divides by 4 again: it prints 12.4 s where the prose's worked example gives 32 s. Taken at "
                 "its word (`divide=1`, the 'calibration as stated' switch) the step is 42.6 s.")]


class Knobs(BaseModel):
    params_b: float = Field(7, ge=1, le=70, description="params (B)")
    k: int = Field(16, ge=1, le=32, description="K")
    length: int = Field(1024, ge=128, le=8192, description="response length", json_schema_extra={"step": 128})
    topology: Literal["colocated", "disaggregated", "async"] = Field("disaggregated", description="topology")
    as_stated: bool = Field(False, description="calibration as stated (no second ÷4)")


def compute(k: Knobs) -> dict:
    from rlpt.perf.throughput import role_widget, useful_tokens_per_sec
    t = role_widget(k.params_b, k.k, k.length, k.topology, 64, 1 if k.as_stated else 4)
    step = t.step(k.topology)
    return {"roles": {r: getattr(t, r) for r in ("rollout", "verify", "ref", "train", "sync")}, "step_s": step,
            "tok_s": useful_tokens_per_sec(64, k.k, k.length, step), "rollout_share": t.rollout / step,
            "per_topology": {top: t.step(top) for top in ("colocated", "disaggregated", "async")}}


def render(r: dict) -> str:
    k = svg.kpis([("τ_step", f'{r["step_s"]:.1f} s'), ("tok/s", f'{r["tok_s"]:,.0f}'),
                  ("rollout share", f'{100 * r["rollout_share"]:.0f}%')])
    roles = r["roles"]
    return (k + svg.bar_chart(list(roles), {"seconds": list(roles.values())}, "seconds", "seconds per role")
            + svg.table(["topology", "τ_step (s)"], [[t, s] for t, s in r["per_topology"].items()]))
