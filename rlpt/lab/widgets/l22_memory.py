"""Lesson 22 · "Memory envelope": rlpt.perf.memory.envelope, training and inference bytes per GPU.

    train/GPU = 18·P/G + activations (÷8 with checkpointing);  infer/GPU = 2·P/tp + B·L·KV/token/tp, tp = min(G, 8)
"""
from __future__ import annotations

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "Memory envelope"
SOURCE = ["rlpt.perf.memory:envelope", "rlpt.perf.memory:train_bytes", "rlpt.perf.memory:activation_bytes"]
NOTES = [("course", "Defaults (7B, seq 8192, batch 4, 8 GPUs, checkpointing): 32.9 GB train/GPU, 2.3 GB "
                    "inference/GPU, 128 KB of KV per token. Breaking: checkpointing off → 153 GB; 70B → 233 GB."),
         ("fix", "The widget does not divide activations by the GPU count, so 70B on 64 GPUs still shows 94.8 GB "
                 "per GPU; rlpt reproduces the widget's formula and says so (rlpt/perf/memory.py)."),
         ("fix", "The lesson's '12 bytes/param with bf16 Adam state' does not add up: 2+4+4+2+2 = 14.")]


class Knobs(BaseModel):
    size_b: float = Field(7, ge=1, le=700, description="model size (B params)")
    seq: int = Field(8192, ge=1024, le=65536, description="seq len", json_schema_extra={"step": 1024})
    batch: int = Field(4, ge=1, le=128, description="batch")
    gpus: int = Field(8, ge=1, le=64, description="GPUs (FSDP)")
    checkpoint: bool = Field(True, description="activation checkpointing")


def compute(k: Knobs) -> dict:
    from rlpt.perf.memory import GB, envelope
    e = envelope(k.size_b, k.seq, k.batch, k.gpus, k.checkpoint)
    return {"train_gb": e.train_per_gpu / GB, "infer_gb": e.infer_per_gpu / GB, "kv_per_token": e.kv_per_token,
            "activations_gb": e.activations / GB, "hbm_gb": e.hbm / GB, "fits": e.fits,
            "by_gpus": [(g, envelope(k.size_b, k.seq, k.batch, g, k.checkpoint).train_per_gpu / GB)
                        for g in range(1, 65)]}


def render(r: dict) -> str:
    k = svg.kpis([("train / GPU", f'{r["train_gb"]:.1f} GB'), ("inference / GPU", f'{r["infer_gb"]:.1f} GB'),
                  ("activations", f'{r["activations_gb"]:.1f} GB'), ("KV / token", f'{r["kv_per_token"]:,} B'),
                  ("fits in 80 GB", "yes" if r["fits"] else "no")])
    return k + svg.line_chart({"train GB / GPU": r["by_gpus"], "80 GB": [(1, r["hbm_gb"]), (64, r["hbm_gb"])]},
                              "GPUs", "GB", "training memory per GPU")
