"""Lesson 20 · "KV cache footprint & bandwidth" on one 80 GB H100: rlpt.perf.memory.kv_widget, plus the paged
block count for K samples sharing one prompt (rlpt.perf.memory.paged_blocks, the engine's block manager rule).

    KV/token = 2 (K and V) · layers · d_kv · 2 bytes;  total = B · L · KV/token;  step ≈ total / 3350 GB/s
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "KV cache footprint & bandwidth"
SOURCE = ["rlpt.perf.memory:kv_widget", "rlpt.perf.memory:paged_blocks"]
NOTES = [("course", "Defaults (7B, GQA-8, B=32, L=2048): 128 KB per token, 8.0 GiB of KV, 66 GB free, "
                    "≈2.4 ms per decode step, weight bandwidth dominates KV."),
         ("course", "Breaking: 7B MHA fails at B=32 once L ≥ 4352 on the 128-token slider (4224 is exactly the 66 GiB "
                    "free, and the widget's test is a strict >); GQA at B=256, L=4096 needs 128 GiB."),
         ("fix", "70B is always over budget in this widget: its 140 GB of weights alone exceed one 80 GB GPU (the "
                 "widget models a single GPU); the lab prints 0 GB free rather than a negative number."),
         ("fix", "The course's 70B capacity example, 256 × 8k streams ≈ 670 GB, is 687 GB (decimal) or 640 GiB "
                 "exactly.")]


class Knobs(BaseModel):
    batch: int = Field(32, ge=1, le=512, description="concurrency B")
    seq: int = Field(2048, ge=128, le=32768, description="avg seq len L", json_schema_extra={"step": 128})
    gqa: bool = Field(True, description="GQA-8")
    model: Literal["7b", "70b"] = Field("7b", description="model")
    k: int = Field(16, ge=1, le=64, description="samples per prompt (paged blocks)")


def compute(k: Knobs) -> dict:
    from rlpt.perf.memory import kv_widget, paged_blocks
    w = kv_widget(k.batch, k.seq, k.gqa, k.model)
    prompt, completion = k.seq // 2, k.seq - k.seq // 2
    w["paged_blocks_shared"] = paged_blocks(prompt, completion, k.k, 16, True)
    w["paged_blocks_copied"] = paged_blocks(prompt, completion, k.k, 16, False)
    w["curve"] = [(b, kv_widget(b, k.seq, k.gqa, k.model)["total_gib"]) for b in range(1, 513, 16)]
    w["free_line"] = w["free_gb"]
    return w


def render(r: dict) -> str:
    over = r["bottleneck"].startswith("HBM")
    k = svg.kpis([("KV / token", f'{r["kv_per_token"] / 1024:.0f} KB'), ("KV total", f'{r["total_gib"]:.1f} GiB'),
                  ("free HBM", f'{r["free_gb"]:.0f} GB'), ("decode step", f'{r["step_ms"]:.2f} ms'),
                  ("bottleneck", r["bottleneck"]),
                  ("paged blocks (shared prompt / copied)",
                   f'{r["paged_blocks_shared"]} / {r["paged_blocks_copied"]}')])
    plot = svg.line_chart({"KV GiB vs batch": r["curve"], "free GB": [(1, r["free_line"]), (512, r["free_line"])]},
                          "batch B", "GiB", "KV footprint")
    return k + ('<p class="warn">does not fit on one GPU</p>' if over else "") + plot
