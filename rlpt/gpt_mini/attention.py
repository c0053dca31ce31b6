"""gpt_mini's attention kernel: softmax(q·kᵀ/√d + mask)·v, causal when no mask is given.

Two CPU choices, both measured (`python bench/attention.py`):

- **fp32 under bf16 autocast.** The CPU's bf16 flash-attention backward is ~9x slower than fp32 at these head
  sizes, which cancelled the bf16 matmuls' gain (the recipe's model: bf16 step 0.99x fp32 with bf16 attention,
  1.85x with fp32 attention; `bench/train_throughput.py --bf16 [--attn-bf16]`). So q, k, v are cast up and the
  next projection casts the output back to bf16; the logits only get closer to fp32's.
- **Flash, not matmuls, for short causal rows** (measured, 3 Dec, AMD EPYC, 1 thread): two batched matmuls + a
  softmax against PyTorch's CPU flash kernel, forward + backward on (64, 4, T, 32) in fp32, alternating medians:
  flash / math 1.40x at T = 16, 0.90x at 32, 1.04x at 48, 0.88x at 64, 0.61x at 256 (8 rows); in the trainer's
  GRPO step (64 rows x 40 tokens) 0.995x in fp32 and 1.015x in bf16: a tie. So `MATH_MAX_T` is 0 (off); set it
  (causal rows up to that length take `causal_math` on a CPU) and rerun `python bench/attention.py` on a CPU
  where the balance may differ (the Intel machines' AMX). The two agree to ~1e-6 (fp32 rounding; the test).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MATH_MAX_T = 0           # causal rows up to this length take the matmul path on a CPU (0: never; module doc)
_CAUSAL: dict[tuple, torch.Tensor] = {}


def causal_bias(T: int, device, dtype) -> torch.Tensor:
    """(T, T): 0 on and below the diagonal, -inf above (cached per shape, device and dtype)."""
    key = (T, str(device), dtype)
    if key not in _CAUSAL:
        _CAUSAL[key] = torch.full((T, T), float("-inf"), device=device, dtype=dtype).triu(1)
    return _CAUSAL[key]


def causal_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention as softmax(q·kᵀ·d^-1/2 + causal_bias)·v, q, k, v (..., T, d)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + causal_bias(q.shape[-2], q.device,
                                                                                        q.dtype)
    return torch.matmul(scores.softmax(-1), v)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q·kᵀ/√d + mask)·v, causal when `mask` is None (module doc: which kernel runs)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            if mask is not None and mask.is_floating_point():
                mask = mask.float()
            return sdpa(q.float(), k.float(), v.float(), mask)
    if mask is None:
        T = q.shape[-2]
        if q.device.type == "cpu" and T <= MATH_MAX_T and k.shape[-2] == T:
            return causal_math(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
