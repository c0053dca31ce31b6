"""Memory math (lesson 22, KV from lesson 20): bytes per parameter, activations, the KV cache, RL's four copies.

    train bytes  = P · (weights + master + grads + optimizer state)      18 B/param for bf16 + fp32 master + AdamW
    activations  ≈ N · L · B · (12·d + 2·L) · bytes                       12d: residual and MLP; 2L: attention scores
    KV per token = 2 · n_layers · n_kv_heads · head_dim · bytes           2: K and V; GQA shrinks it by H / H_kv

Units: bytes everywhere; GB = 1e9 (lesson 22's widget), GiB = 2**30 (lesson 20's widget, which also calls
131,072 B "128 KB"). Where the course's own arithmetic is off, the function gives the exact value and
tests/test_perf.py says what the course printed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rlpt.perf.configs import ModelShape, named

GB, GiB = 1e9, 2 ** 30
H100_HBM = 80e9


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each thing training keeps per weight."""
    weights: int
    master: int          # fp32 copy the optimizer updates (0: the weights are their own master)
    grads: int
    optim: int           # AdamW's m and v together

    @property
    def total(self) -> int:
        return self.weights + self.master + self.grads + self.optim


PRECISIONS = {
    "bf16-mixed": Precision(2, 4, 4, 8),    # lesson 22's 18 B: bf16 weights, fp32 master, fp32 grads, fp32 m and v
    "fp32": Precision(4, 0, 4, 8),          # 16 B: "without the master copy" (fp32 weights are the master); gpt_mini
    "bf16-adam": Precision(2, 4, 4, 4),     # bf16 m and v: 14 B (lesson 22 says 12, which needs more than this)
    "pure-bf16": Precision(2, 0, 2, 4),     # everything bf16, no master: 8 B (no fp32 anywhere: lossy updates)
}
INFERENCE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


def precision(name: str) -> Precision:
    if name not in PRECISIONS:
        from rlpt.config import ConfigError
        raise ConfigError(f"unknown training precision {name!r}: one of {sorted(PRECISIONS)}")
    return PRECISIONS[name]


def train_bytes(params: float, prec: str = "bf16-mixed") -> float:
    """Weights, master, gradients and AdamW state: P · bytes/param (7 B at 18 B/param = 126 GB)."""
    return params * precision(prec).total


def min_gpus(params: float, prec: str = "bf16-mixed", hbm: float = H100_HBM) -> int:
    """Devices whose memory holds the sharded training state (before activations): ⌈P·bytes / HBM⌉."""
    return math.ceil(train_bytes(params, prec) / hbm)


def activation_bytes(n_layers: int, seq: int, batch: int, d_model: int, bytes_per: int = 2,
                     checkpoint: str = "none") -> float:
    """Activations kept for the backward pass: N·L·B·(12d + 2L)·bytes (lesson 22).

    checkpoint="full": recompute each layer in the backward, divided by 8 as lesson 22's widget does (the
    lesson's "an order of magnitude" for +33 % forward FLOPs); "selective": recompute only the attention
    scores (Korthikanti et al. 2022), i.e. drop the quadratic 2L term."""
    per_token_layer = {"none": 12 * d_model + 2 * seq, "full": (12 * d_model + 2 * seq) / 8,
                       "selective": 12 * d_model}
    if checkpoint not in per_token_layer:
        from rlpt.config import ConfigError
        raise ConfigError(f"unknown checkpoint mode {checkpoint!r}: none, full or selective")
    return n_layers * seq * batch * per_token_layer[checkpoint] * bytes_per


def llama_activation_bytes(shape: ModelShape, seq: int, batch: int, bytes_per: int = 4) -> float:
    """What autograd keeps per token and layer for rlpt's own block (RMSNorm, GQA attention with RoPE, SwiGLU;
    PyTorch's flash attention, so no L×L scores): ≈ 12·d + 4·d_ff + 4·d_kv elements (two norms' inputs and
    outputs, q and RoPE's rotated copies, GQA's K/V repeated to d, the attention output, SwiGLU's gate, up,
    silu and product). Lesson 22's 12·d + 2·L counts a GPT-2 block in bf16 with its scores stored."""
    per = 12 * shape.d_model + 4 * shape.d_ff + 4 * shape.kv_dim
    return shape.n_layers * seq * batch * per * bytes_per


def logits_bytes(tokens: int, vocab: int, bytes_per: int = 2, copies: int = 1) -> float:
    """The (tokens, V) logits a log-prob forward materialises, per copy (logits, log-softmax, and in the backward
    their gradients). Lesson 25: 32k tokens × 128k vocab in bf16 = 8 GB each, why chunked CE pays."""
    return tokens * vocab * bytes_per * copies


@dataclass(frozen=True)
class TrainerMemory:
    state: float          # weights, master, grads, optimizer
    grads: float          # the part of `state` that lives only during the step (set_to_none after it)
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.state + self.activations + self.logits

    @property
    def transient(self) -> float:
        """What a step adds on top of what stays resident between steps (weights, optimizer state)."""
        return self.grads + self.activations + self.logits


def trainer_memory(shape: ModelShape, rows: int, seq: int, prec: str = "fp32", act_bytes: int = 4,
                   activations: str = "course", logit_copies: int = 4) -> TrainerMemory:
    """Peak of one trainer step on a (rows, seq) batch: its state (P · bytes/param), activations (lesson 22's
    formula, `activations="course"`, or rlpt's block count, "llama") and `logit_copies` (rows, seq, V) logit
    tensors (logits, log-softmax and their two gradients)."""
    act = llama_activation_bytes(shape, seq, rows, act_bytes) if activations == "llama" else \
        activation_bytes(shape.n_layers, seq, rows, shape.d_model, act_bytes)
    return TrainerMemory(train_bytes(shape.params, prec), shape.params * precision(prec).grads, act,
                         logits_bytes(rows * seq, shape.vocab_size, act_bytes, logit_copies))


def kv_bytes_per_token(shape: ModelShape, bytes_per: int = 2) -> int:
    """2 (K and V) · layers · n_kv_heads · head_dim · bytes (lesson 20): Llama-3-8B in bf16 → 131,072 B."""
    return 2 * shape.n_layers * shape.kv_dim * bytes_per


def kv_bytes(shape: ModelShape, tokens: int, bytes_per: int = 2) -> float:
    """KV of `tokens` cached tokens (batch × length): lesson 20's capacity B · L · KV/token."""
    return tokens * kv_bytes_per_token(shape, bytes_per)


def paged_blocks(prompt: int, completion: int, k: int, block: int = 16, shared: bool = True) -> int:
    """Blocks a group of K samples of one prompt holds (lesson 20): with prefix sharing
    ⌈prompt/block⌉ + K·⌈completion/block⌉, without K·⌈(prompt + completion)/block⌉. Sharing is block-aligned:
    the prompt's partial last block is copied on write, so it counts in each completion here."""
    if not shared:
        return k * math.ceil((prompt + completion) / block)
    full = prompt // block
    return full + k * math.ceil((prompt - full * block + completion) / block)


def prefix_sharing_ratio(k: int, completion_over_prompt: float) -> float:
    """KV saved by sharing a prompt of P tokens across K samples of G tokens: K·P / (P + K·G) = K / (1 + K·G/P)
    (lesson 25): G/P = 0.1 gives 6.2× at K = 16 and 8.6× at K = 64."""
    return k / (1 + k * completion_over_prompt)


@dataclass(frozen=True)
class Envelope:
    train_per_gpu: float       # bytes
    infer_per_gpu: float
    kv_per_token: int
    activations: float        # the whole batch's, not sharded (the widget's choice)
    hbm: float = H100_HBM

    @property
    def fits(self) -> bool:
        return self.train_per_gpu < self.hbm and self.infer_per_gpu < self.hbm


def envelope(size_b: float, seq: int = 8192, batch: int = 4, gpus: int = 8, checkpoint: bool = True) -> Envelope:
    """Lesson 22's "Memory envelope" widget, defaults included (7 B, 8 k, batch 4, 8 GPUs, checkpointing on):
        train/GPU = 18·P/G + activations (÷8 when checkpointing; activations are NOT divided by G)
        infer/GPU = 2·P/tp + B·L·KV/token / tp,   tp = min(G, 8), with the widget's 8 KV heads
    Defaults: 32.9 GB train, 2.3 GB inference, 131,072 B (the widget's "128 KB") per token."""
    m = named(size_b)
    p = m.params
    act = activation_bytes(m.n_layers, seq, batch, m.d_model, 2, "full" if checkpoint else "none")
    tp = min(gpus, 8)
    kv_tok = kv_bytes_per_token(m, 2)
    return Envelope(train_bytes(p) / gpus + act, 2 * p / tp + batch * seq * kv_tok / tp, kv_tok, act)


@dataclass(frozen=True)
class RLCopies:
    """Bytes per device of each role of an RL topology (lesson 22's "four copies" table)."""
    trainer: float
    reference: float
    rollout: float
    snapshot: float = 0.0

    def rows(self) -> list[tuple[str, float]]:
        return [("trainer", self.trainer), ("reference", self.reference), ("rollout", self.rollout),
                ("old-policy snapshot", self.snapshot)]


def rl_copies(params: float, trainer_gpus: int, ref_gpus: int, rollout_gpus: int, kv_total: float,
              activations: float = 0.0, rollout_tp: int = 1, prec: str = "bf16-mixed", snapshot_bytes: float = 0.0,
              critic: bool = False, reference: bool = True) -> RLCopies:
    """Per device: trainer 18·P/N_train + activations (+ a critic's 18·P/N_train for PPO), reference 2·P/N_ref,
    rollout 2·P/tp + KV/N_rollout (each TP group holds the weights; the KV splits over every rollout device),
    old-policy snapshot 0–2 B/param (async). GRPO drops the critic; DPO drops rollout (and the RM)."""
    state = train_bytes(params, prec) / trainer_gpus
    return RLCopies(trainer=state * (2 if critic else 1) + activations,
                    reference=2 * params / ref_gpus if reference else 0.0,
                    rollout=2 * params / rollout_tp + kv_total / rollout_gpus if rollout_gpus else 0.0,
                    snapshot=snapshot_bytes * params / trainer_gpus)


def kv_widget(batch: int = 32, seq: int = 2048, gqa: bool = True, model: str = "7b") -> dict:
    """Lesson 20's "KV cache footprint & bandwidth" widget (one 80 GB H100, GiB, 3350 GB/s):
    defaults 131,072 B/token, 8.0 GiB, 66 GB free, 2.4 ms per decode step, 'weight bandwidth dominates KV'."""
    layers, d_kv, weights_gb = {"7b": (32, 1024 if gqa else 4096, 14), "70b": (80, 1024 if gqa else 8192, 140)}[model]
    per_tok = 2 * layers * d_kv * 2
    total = batch * seq * per_tok / GiB
    free = max(0, 80 - weights_gb)
    if total > 80 - weights_gb:
        label = "HBM capacity: split across GPUs"
    elif total > 5 * weights_gb:
        label = "KV bandwidth (decode-bound)"
    elif total > weights_gb:
        label = "KV bandwidth dominates weights"
    else:
        label = "weight bandwidth dominates KV"
    return {"kv_per_token": per_tok, "total_gib": total, "free_gb": free, "step_ms": total / 3350 * 1000,
            "bottleneck": label}
