"""FLOPs and bandwidth (lessons 22 and 28): what a token costs, and how close a run gets to the hardware.

    forward 2·P FLOPs/token;  train 6·P (backward 4·P);  train with full recompute 8·P
    MFU = tokens/s · FLOPs/token / peak FLOP/s;   MBU = bytes read/s / peak bandwidth
    decode step ≈ (weight bytes + KV bytes read) / bandwidth   (batch 1..~64 decode is memory-bound)

The H100 constants are the course's (lesson 22: 989 TF dense bf16 peak, 800 TF sustained, 3.35 TB/s).
"""
from __future__ import annotations

from dataclasses import dataclass

H100_PEAK_FLOPS = 989e12
H100_SUSTAINED_FLOPS = 800e12
H100_HBM_BW = 3.35e12

FLOPS_PER_PARAM = {"forward": 2, "train": 6, "recompute": 8}


def flops_per_token(params: float, mode: str = "train") -> float:
    """2P forward, 6P train (backward 4P), 8P train with full activation recompute (one more forward)."""
    return FLOPS_PER_PARAM[mode] * params


def train_tokens_per_sec(params: float, flops: float = H100_SUSTAINED_FLOPS, recompute: bool = False) -> float:
    """One device's training throughput: flops / (6P) (8P with recompute). 7 B at 800 TF → 19k tok/s."""
    return flops / flops_per_token(params, "recompute" if recompute else "train")


def mfu(tokens_per_sec: float, params: float, peak_flops: float, mode: str = "train") -> float:
    """Model FLOPs utilisation of a measured rate: achieved model FLOP/s over the peak."""
    return tokens_per_sec * flops_per_token(params, mode) / peak_flops


def mbu(bytes_per_sec: float, bandwidth: float) -> float:
    """Memory bandwidth utilisation: bytes the step must read per second over the peak bandwidth."""
    return bytes_per_sec / bandwidth


@dataclass(frozen=True)
class Decode:
    step_s: float              # one decode step of the whole batch
    tokens_per_sec: float      # aggregate over the batch
    per_seq_tokens_per_sec: float
    bound: str                 # "memory" or "compute"


def decode_step(weight_bytes: float, kv_bytes: float, batch: int, params: float,
                bandwidth: float = H100_HBM_BW, flops: float = H100_SUSTAINED_FLOPS) -> Decode:
    """One decode step reads every weight once (shared by the batch) and each sequence's KV (not shared), and
    does 2P FLOPs per sequence: time = max(bytes / bandwidth, 2·P·batch / flops). Lesson 28's 7 B on an H100
    (14 GB weights + 8.6 GB KV at B = 32, L = 2048): 6.7 ms → 4.7k tok/s, 148 tok/s per sequence."""
    t_mem = (weight_bytes + kv_bytes) / bandwidth
    t_cmp = 2 * params * batch / flops
    t = max(t_mem, t_cmp)
    return Decode(t, batch / t, 1 / t, "memory" if t_mem >= t_cmp else "compute")
