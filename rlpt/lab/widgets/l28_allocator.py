"""Lesson 28 · "Optimization-budget allocator": rlpt.perf.throughput.allocator_widget (multipliers per role).

Sliders are percents of a 100 s step; algo = max(0, 100 − the rest) is never optimised.
"""
from __future__ import annotations

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "Optimization-budget allocator"
SOURCE = ["rlpt.perf.throughput:allocator_widget", "rlpt.perf.throughput:allocate"]
NOTES = [("course", "Defaults (60/20/10/5, prefix caching, continuous batching, chunked CE, packing, FSDP+ckpt on): "
                    "43.9 s, 2.28×. Everything on (+spec decode, FP8, async overlap, separate ref): ≈21.6 s, 4.63×, "
                    "train becomes the largest role (44%)."),
         ("fix", "The sliders can sum past 100; the baseline then exceeds the widget's '100 s' axis label (the lab "
                 "prints the real baseline).")]


class Knobs(BaseModel):
    rollout: float = Field(60, ge=20, le=90, description="rollout %")
    train: float = Field(20, ge=5, le=50, description="train %")
    ref: float = Field(10, ge=0, le=30, description="ref %")
    sync: float = Field(5, ge=0, le=30, description="sync %")
    prefix_caching: bool = Field(True, description="prefix caching")
    continuous_batching: bool = Field(True, description="continuous batching")
    speculative_decoding: bool = Field(False, description="speculative decoding")
    fp8_rollout: bool = Field(False, description="FP8 rollout")
    chunked_ce: bool = Field(True, description="chunked CE")
    sequence_packing: bool = Field(True, description="sequence packing")
    fsdp_checkpointing: bool = Field(True, description="FSDP + checkpointing")
    async_overlap: bool = Field(False, description="async overlap")
    sync_every_5: bool = Field(False, description="sync every 5 steps")
    separate_ref_pool: bool = Field(False, description="separate ref pool")


NAMES = {"prefix_caching": "prefix caching", "continuous_batching": "continuous batching",
         "speculative_decoding": "speculative decoding", "fp8_rollout": "FP8 rollout", "chunked_ce": "chunked CE",
         "sequence_packing": "sequence packing", "fsdp_checkpointing": "FSDP + checkpointing",
         "async_overlap": "async overlap", "sync_every_5": "sync every 5 steps",
         "separate_ref_pool": "separate ref pool"}


def compute(k: Knobs) -> dict:
    from rlpt.perf.throughput import ROLES, allocator_widget
    a = allocator_widget(k.rollout, k.train, k.ref, k.sync, {NAMES[f]: getattr(k, f) for f in NAMES})
    role, share = a.largest()
    return {"baseline": a.baseline, "total": a.total, "speedup": a.speedup, "largest": role, "largest_share": share,
            "roles": {r: getattr(a.optimised, r) for r in ROLES}, "applied": a.applied}


def render(r: dict) -> str:
    k = svg.kpis([("baseline", f'{r["baseline"]:.0f} s'), ("optimised", f'{r["total"]:.1f} s'),
                  ("speedup", f'{r["speedup"]:.2f}×'),
                  ("largest role now", f'{r["largest"]} ({100 * r["largest_share"]:.0f}%)')])
    roles = r["roles"]
    return k + svg.bar_chart(list(roles), {"seconds after": list(roles.values())}, "seconds", "optimised step")
