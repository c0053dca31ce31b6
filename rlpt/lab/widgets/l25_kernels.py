"""Lesson 25 · two kernel surfaces as numbers: the prefix-sharing ratio that makes prefix-aware paged attention
the first kernel to write, and the logits a log-prob recompute materialises (why chunked cross-entropy pays).

    sharing = K·P / (P + K·G) = K / (1 + K·G/P);   logits = tokens · V · bytes;  chunked: tokens · V_chunk · bytes
"""
from __future__ import annotations

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "Prefix sharing and the logits wall"
SOURCE = ["rlpt.perf.memory:prefix_sharing_ratio", "rlpt.perf.memory:logits_bytes"]
NOTES = [("course", "G/P = 0.1: K = 16 shares ≈6.2×, K = 64 ≈8.6×. 32k tokens × 128k vocab in bf16 = 8 GB of logits "
                    "(+8 GB for the log-softmax, and the backward again); 1k-vocab chunks cut that to ≈64 MB."),
         ("fix", "The lesson writes the recompute kernel as 'gather → log_softmax'; it is log_softmax over the "
                 "vocabulary, then gather the sampled token (rlpt/framework/trajectory.py per_token_logp).")]


class Knobs(BaseModel):
    k: int = Field(16, ge=1, le=256, description="K samples per prompt")
    g_over_p: float = Field(0.1, ge=0.01, le=10, description="G/P (completion / prompt)",
                            json_schema_extra={"step": 0.01})
    tokens: int = Field(32768, ge=1024, le=1048576, description="tokens per log-prob pass",
                        json_schema_extra={"step": 1024})
    vocab: int = Field(128000, ge=1000, le=262144, description="vocabulary V", json_schema_extra={"step": 1000})
    chunk: int = Field(1024, ge=128, le=262144, description="vocab chunk (chunked CE)", json_schema_extra={"step": 128})


def compute(k: Knobs) -> dict:
    from rlpt.perf.memory import GB, logits_bytes, prefix_sharing_ratio
    return {"sharing": prefix_sharing_ratio(k.k, k.g_over_p),
            "by_k": {f"G/P {g:g}": [(kk, prefix_sharing_ratio(kk, g)) for kk in range(1, 257, 5)]
                     for g in (0.05, 0.1, 0.5, k.g_over_p)},
            "logits_gb": logits_bytes(k.tokens, k.vocab, 2) / GB,
            "naive_peak_gb": logits_bytes(k.tokens, k.vocab, 2, copies=2) / GB,
            "chunked_mb": logits_bytes(k.tokens, min(k.chunk, k.vocab), 2) / 1e6,
            "chunk_factor": k.vocab / min(k.chunk, k.vocab)}


def render(r: dict) -> str:
    k = svg.kpis([("prefix sharing", f'{r["sharing"]:.2f}×'), ("logits (bf16)", f'{r["logits_gb"]:.1f} GB'),
                  ("+ log-softmax", f'{r["naive_peak_gb"]:.1f} GB'), ("chunked", f'{r["chunked_mb"]:.0f} MB'),
                  ("chunking saves", f'{r["chunk_factor"]:.0f}×')])
    return k + svg.line_chart(r["by_k"], "K", "KV saved (×)", "prefix-sharing ratio")
