"""gpt_mini's attention kernel: softmax(q·kᵀ/√d + mask)·v, causal when no mask is given.

Three CPU choices, all measured (`python bench/attention.py`, AMD EPYC with AVX-512-BF16, 1 thread, 3 Dec):

- **Under bf16 autocast, short causal rows by bf16 matmuls** (`BF16_MATH_MAX_T` = 64, on): two batched matmuls +
  a softmax, which autocast runs in bf16. The trainer's GRPO step (64 rows x 34 tokens) 1.07-1.10x faster than
  with fp32 flash attention, its log-probs as close to fp32's (mean |Δ| 8.7e-4 against 9.1e-4); per layer,
  forward + backward, 2.5 ms against 4.3 ms. With bf16 emulated (AVX2 only: `ONEDNN_MAX_CPU_ISA=AVX2
  ATEN_CPU_CAPABILITY=avx2` on this CPU) the path is 0.96x, but there the bf16 step is 8x slower than fp32 either
  way (1.78 s against 0.21 s): keep `trainer.precision=fp32` on such CPUs (the trainer prints its bf16 path).
- **Otherwise fp32 under bf16 autocast.** The CPU's bf16 flash-attention backward is ~9x slower than fp32 at these
  head sizes, which cancelled the bf16 matmuls' gain (the recipe's model: bf16 step 0.99x fp32 with bf16 flash
  attention, 1.85x with fp32; `bench/train_throughput.py --bf16 [--attn-bf16]`). So for masked attention and
  rows longer than 64, q, k, v are cast up and the next projection casts the output back to bf16.
- **In fp32, flash, not matmuls, for short causal rows** (`MATH_MAX_T` = 0, off): the matmul path against
  PyTorch's CPU flash kernel, forward + backward on (64, 4, T, 32), alternating medians: flash / math 1.40x at
  T = 16, 0.90x at 32, 1.04x at 48, 0.88x at 64, 0.61x at 256 (8 rows); in the fp32 trainer step 0.98-1.0x, a
  tie. Set it and rerun the bench on a CPU where the balance may differ (the Intel machines' AMX). The two agree
  to ~1e-6 (fp32 rounding; tests/test_varlen.py).

The engine's paged attention is its own (rlpt/engine); these choices are the trainer's, the reference's, DPO's
and the plain forward's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MATH_MAX_T = 0           # fp32: causal rows up to this length take the matmul path on a CPU (0: never; module doc)
BF16_MATH_MAX_T = 64     # bf16 autocast: causal rows up to this length take the matmul path in bf16 (0: never)
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


def short_causal(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, limit: int) -> bool:
    """A causal self-attention (no mask, as many keys as queries) of at most `limit` tokens, on a CPU."""
    return q.device.type == "cpu" and mask is None and k.shape[-2] == q.shape[-2] <= limit


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q·kᵀ/√d + mask)·v, causal when `mask` is None (module doc: which kernel runs)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        if short_causal(q, k, mask, BF16_MATH_MAX_T):
            return causal_math(q, k, v)                 # under autocast: bf16 matmuls and softmax
        with torch.autocast("cpu", enabled=False):
            if mask is not None and mask.is_floating_point():
                mask = mask.float()
            return sdpa(q.float(), k.float(), v.float(), mask)
    if short_causal(q, k, mask, MATH_MAX_T):
        return causal_math(q, k, v)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
