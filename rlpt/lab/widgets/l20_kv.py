"""Lesson 20 · "KV cache footprint & bandwidth" on one 80 GB H100: rlpt.perf.memory.kv_widget; and PagedAttention
on the engine's real BlockManager (rlpt/engine/block_manager.py): K samples of one prompt share its blocks and copy
the partial last one on write; the block tables are the manager's own, checked against the formula in rlpt.perf.

    KV/token = 2 (K and V) · layers · d_kv · 2 bytes;  total = B · L · KV/token;  step ≈ total / 3350 GB/s
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "KV cache footprint & bandwidth"
SOURCE = ["rlpt.perf.memory:kv_widget", "rlpt.engine.block_manager:BlockManager.prepare_write",
          "rlpt.engine.block_manager:BlockManager.share", "rlpt.perf.memory:paged_blocks"]
NOTES = [("course", "Defaults (7B, GQA-8, B=32, L=2048): 128 KB per token, 8.0 GiB of KV, 66 GB free, "
                    "≈2.4 ms per decode step, weight bandwidth dominates KV."),
         ("course", "Breaking: 7B MHA fails at B=32 once L ≥ 4352 on the 128-token slider (4224 is exactly the 66 GiB "
                    "free, and the widget's test is a strict >); GQA at B=256, L=4096 needs 128 GiB."),
         ("fix", "70B is always over budget in this widget: its 140 GB of weights alone exceed one 80 GB GPU (the "
                 "widget models a single GPU); the lab prints 0 GB free rather than a negative number."),
         ("course", "PagedAttention: K samples hold ⌈P/bs⌉ shared prompt blocks + K·(their own), not K·⌈(P+G)/bs⌉. "
                    "P = 160, G = 32, K = 16: 42 blocks instead of 192 (the partial last prompt block, if any, is "
                    "copied on the first write: 150/20 → 41)."),
         ("fix", "The course's 70B capacity example, 256 × 8k streams ≈ 670 GB, is 687 GB (decimal) or 640 GiB "
                 "exactly.")]


class Knobs(BaseModel):
    batch: int = Field(32, ge=1, le=512, description="concurrency B")
    seq: int = Field(2048, ge=128, le=32768, description="avg seq len L", json_schema_extra={"step": 128})
    gqa: bool = Field(True, description="GQA-8")
    model: Literal["7b", "70b"] = Field("7b", description="model")
    prompt: int = Field(160, ge=1, le=2048, description="prompt tokens (paged)")
    completion: int = Field(32, ge=1, le=2048, description="tokens generated per sample")
    k: int = Field(16, ge=1, le=64, description="samples per prompt K")
    block_size: int = Field(16, ge=1, le=64, description="block size")


def compute(k: Knobs) -> dict:
    from rlpt.engine.block_manager import BlockManager, cdiv
    from rlpt.perf.memory import kv_widget, paged_blocks
    w = kv_widget(k.batch, k.seq, k.gqa, k.model)
    # the engine's path for one request with n = K: prefill the prompt, fork K tables, decode into each
    bm = BlockManager(cdiv(k.prompt + k.completion, k.block_size) * k.k + 1, k.block_size)
    parent: list[int] = []
    bm.prepare_write(parent, 0, k.prompt)
    kids = [bm.share(parent) for _ in range(k.k)]
    bm.release(parent)
    copies = [bm.prepare_write(t, k.prompt, k.prompt + k.completion) for t in kids]
    bm.check(kids)
    w["paged_used"] = bm.num_used
    w["paged_formula"] = paged_blocks(k.prompt, k.completion, k.k, k.block_size, True)
    w["paged_copied"] = paged_blocks(k.prompt, k.completion, k.k, k.block_size, False)
    w["cow_copies"] = sum(len(c) for c in copies)
    w["tables"] = kids[:8]
    w["shared_blocks"] = k.prompt // k.block_size
    w["curve"] = [(b, kv_widget(b, k.seq, k.gqa, k.model)["total_gib"]) for b in range(1, 513, 16)]
    w["free_line"] = w["free_gb"]
    return w


def render(r: dict) -> str:
    over = r["bottleneck"].startswith("HBM")
    k = svg.kpis([("KV / token", f'{r["kv_per_token"] / 1024:.0f} KB'), ("KV total", f'{r["total_gib"]:.1f} GiB'),
                  ("free HBM", f'{r["free_gb"]:.0f} GB'), ("decode step", f'{r["step_ms"]:.2f} ms'),
                  ("bottleneck", r["bottleneck"]),
                  ("paged blocks used", str(r["paged_used"])), ("without sharing", str(r["paged_copied"])),
                  ("copy-on-write copies", str(r["cow_copies"]))])
    plot = svg.line_chart({"KV GiB vs batch": r["curve"], "free GB": [(1, r["free_line"]), (512, r["free_line"])]},
                          "batch B", "GiB", "KV footprint")
    tables = svg.table(["sample", "block table (shared prompt blocks first)"],
                       [[i, " ".join(map(str, t))] for i, t in enumerate(r["tables"])])
    return (k + ('<p class="warn">does not fit on one GPU</p>' if over else "") + plot
            + f'<h3>The block manager\'s tables (first {len(r["tables"])} samples; '
              f'{r["shared_blocks"]} shared blocks each)</h3>' + tables)
