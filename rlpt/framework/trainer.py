"""Trainer: the only place in the system where gradients flow.

    for epoch, mini-batch:  Σ_chunks  loss_fn(chunk, per_token_logp(model, chunk.input_ids)).backward()
                            clip_grad_norm_(1.0);  AdamW.step()   (wd 0, betas 0.9/0.95)

The loss is a callable (`algorithm.compute_loss`): the trainer never knows which algorithm runs.
Micro-batch chunks keep their mini-batch's aggregation denominators, so the accumulated gradient
equals the full mini-batch gradient (tested), whatever the chunk size. Several epochs or
mini-batches per rollout batch are what make the PPO ratio and clip act at all: with one
update per batch, new_logp == old_logp when the gradient is taken and the clip is a no-op
(lesson 02's traps).

The first forward of a step sees weights that have not moved since the batch was sampled, so it
doubles as the run-time log-prob check (`check/logp_mismatch`) at no extra cost.

An optional `critic` (rlpt.framework.critic, built by an algorithm that wants values, i.e. PPO) is
trained alongside the policy: its values come from the same chunk (a shared-trunk critic reads the
policy forward's hidden state, no second trunk pass) and reach the loss as a keyword,
`loss_fn(chunk, new_logp, values=...)`; its parameters sit in the same optimizer, are clipped on
their own (`grad/norm_critic`, as verl clips its critic separately) and are checkpointed with the
trainer's state. Without a critic nothing changes: `loss_fn(chunk, new_logp)`.

Per step it also logs what lesson 23's failure modes are read from (`rlpt diagnose`): the importance ratio
ρ = π_θ / π_old of every trained token over all the step's updates as quantiles (`ratio/p05`, `ratio/p50`,
`ratio/p95`, `ratio/max`) and a histogram of log ρ (`ratio/hist`, counts over RATIO_BINS: a list in
metrics.jsonl, not a scalar), and the largest gradient norm (`grad/norm_max`). A non-finite loss or gradient
norm skips that optimizer step (gradients dropped, weights untouched; the schedule still advances) and is
counted in `step/nonfinite` (lesson 23: NaN at step 1 is fp16 overflow or a ratio explosion).

Staleness is counted in optimizer steps (lesson 19; miles #2524: several optimizer steps per rollout batch
compound it). `version` is the number of train steps done; a row sampled with weights of version v, trained in
the step's optimizer step j (0 … mini_batches·epochs − 1, epochs outer), is

    staleness = (version − v) × mini_batches × epochs + j

optimizer steps behind the weights it updates: `staleness/mean` over every (row, optimizer step) of the step,
`staleness/max`. In-process with sync.every = 1 and 2 mini-batches: 0 and 1; with sync.every = 2 the
unsynced steps read 2 and 3.

Doing it tighter (issue 14, lesson 22b). `packing=True`: each micro-batch's rows are packed end to end into
fewer, fuller rows (rlpt.framework.trajectory.pack_rows: block-diagonal causal mask, positions restarting per
row; the rows of a group stored after one copy of their shared prompt), so the forward and backward spend no
FLOP on padding or on repeated prompts (1.2-1.4x the padded step here, bench/packing.py); the log-probs come
back in the (B, T-1) layout, so the loss and every metric are unchanged and the gradient equals the padded one
to fp32 rounding (tested ≤ 1e-6).
It applies to a policy whose forward takes segment ids (gpt_mini) and no critic (the critic reads the padded
hidden state); elsewhere the micro-batches are length-bucketed instead: rows sorted by length, each chunk cut
to its own longest row. `precision="bf16"`: the forward runs under CPU autocast (bf16 matmuls, fp32 master
weights, fp32 log-softmax and loss, fp32 AdamW); `bf16_path()` says which kernels run it (AMX, AVX-512-BF16, or
emulated), printed once and logged as `trainer/bf16_native`. The trainer's log-probs then differ from the fp32
sampler's by ~1e-3 per token, so the run-time check uses check.logp_tol_bf16 (rlpt.train).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch

from rlpt.framework.critic import capture_hidden
from rlpt.framework.trajectory import Batch, pack_batch, per_token_logp, supports_packing, trained_lengths

LossFn = Callable[..., tuple[torch.Tensor, dict]]   # (batch, new_logp[, values=]) -> (loss, metrics)

# edges of the log ρ histogram: ρ from e^-1 to e^1, finer near ρ = 1 where a healthy run lives (|log ρ| < 0.05)
RATIO_BINS = (-1.0, -0.3, -0.1, -0.03, -0.01, 0.01, 0.03, 0.1, 0.3, 1.0)


def ratio_stats(log_ratio: torch.Tensor) -> dict:
    """Quantiles of ρ and counts of log ρ per bin, from the (N,) log-ratios of trained tokens.
    `ratio/hist` has len(RATIO_BINS) + 1 counts: below the first edge, between each pair, above the last."""
    if log_ratio.numel() == 0:
        return {}
    rho = log_ratio.double().exp()
    q = torch.quantile(rho, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    edges = torch.tensor(RATIO_BINS, dtype=log_ratio.dtype)
    hist = torch.bincount(torch.bucketize(log_ratio, edges), minlength=len(RATIO_BINS) + 1)
    return {"ratio/p05": q[0].item(), "ratio/p50": q[1].item(), "ratio/p95": q[2].item(),
            "ratio/max": rho.max().item(), "ratio/hist": hist.tolist()}


def bf16_path() -> str:
    """How this CPU runs bf16 matmuls: 'amx' (Intel AMX tiles), 'avx512_bf16' (AVX-512 BF16 dot products, e.g.
    AMD EPYC Zen 4), or 'emulated' (no bf16 instructions, e.g. AVX2 only: autocast still works but is slower
    than fp32, converting every operand)."""
    if torch.cpu._is_amx_tile_supported():
        return "amx"
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512_bf16"
    return "emulated"


def autocast(precision: str):
    """The context a forward runs under: bf16 autocast on CPU, or nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    raise ValueError(f"trainer.precision must be fp32 or bf16, got {precision!r}")


def _merge(parts: list[tuple[float, dict]]) -> dict:
    """Combine metric dicts: 'loss/*' add up (they are shares of one loss), '*_max' take the max,
    the rest are weighted means (weight = tokens of each part)."""
    out: dict = {}
    total = sum(w for w, _ in parts) or 1.0
    for w, m in parts:
        for k, v in m.items():
            v = float(v)
            if k.startswith("loss/") or k == "loss":
                out[k] = out.get(k, 0.0) + v
            elif k.endswith("_max"):
                out[k] = max(out.get(k, v), v)
            else:
                out[k] = out.get(k, 0.0) + v * w / total
    return out


def _mean_over_steps(steps: list[dict]) -> dict:
    out = {}
    for k in steps[0]:
        vals = [s[k] for s in steps if k in s]
        out[k] = max(vals) if k.endswith("_max") else sum(vals) / len(vals)
    return out


class Trainer:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, grad_clip: float = 1.0,
                 micro_batch_size: int = 0, mini_batches: int = 1, epochs: int = 1, temperature: float = 1.0,
                 seed: int = 0, critic: torch.nn.Module | None = None, packing: bool = False,
                 precision: str = "fp32"):
        self.model = model
        self.critic = critic
        self.opt = optimizer
        self.sched = scheduler
        self.grad_clip = grad_clip
        self.micro_batch_size = micro_batch_size
        self.mini_batches = mini_batches
        self.epochs = epochs
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)   # mini-batch shuffling
        self.version = 0                                       # train steps done: bumps whenever the weights change
        autocast(precision)                                    # an unknown precision fails here, not mid-run
        self.precision = precision
        self.packing = packing
        if precision == "bf16":
            print(f"[rlpt] trainer precision bf16: CPU autocast on {bf16_path()} kernels, fp32 master weights")

    def accumulate_grads(self, batch: Batch, loss_fn: LossFn, check: dict | None = None,
                         log_ratios: list | None = None) -> dict:
        """Forward + backward over micro-batch chunks, adding into .grad (no optimizer step).
        `log_ratios` collects the log ρ of every trained token (for ratio_stats)."""
        parts = []
        for chunk in self._chunks(batch):
            new_logp, entropy, outputs = self._forward(chunk)
            if check is not None:   # weights untouched since sampling: new must equal old
                fresh = (chunk.version == self.version)[:, None] * chunk.mask
                if fresh.any():
                    gap = (new_logp.detach() - chunk.old_logp).abs() * fresh
                    check["check/logp_mismatch"] = max(check.get("check/logp_mismatch", 0.0), gap.max().item())
                    check["check/logp_mismatch_sum"] = check.get("check/logp_mismatch_sum", 0.0) + gap.sum().item()
                    check["check/logp_tokens"] = check.get("check/logp_tokens", 0.0) + fresh.sum().item()
            if log_ratios is not None:
                log_ratios.append((new_logp.detach() - chunk.old_logp)[chunk.mask > 0])
            loss, metrics = loss_fn(chunk, new_logp, **outputs)
            loss.backward()
            n = float(chunk.mask.sum())
            metrics = {**metrics, "loss": loss.detach(),
                       "policy/entropy": (entropy * chunk.mask).sum() / max(n, 1.0)}
            parts.append((n, metrics))
        return _merge(parts)

    @property
    def packs(self) -> bool:
        """Whether micro-batches run packed (module doc): asked for, a model that can, and no critic."""
        return self.packing and self.critic is None and supports_packing(self.model)

    def _chunks(self, batch: Batch) -> list[Batch]:
        """Micro-batch chunks; length-bucketed (sorted by length, each cut to its longest row) where packing was
        asked for but does not apply."""
        if not self.packing or self.packs:
            return batch.chunks(self.micro_batch_size)
        return batch.bucketed(self.micro_batch_size, trained_lengths(batch.mask))

    def _forward(self, chunk: Batch):
        """-> new_logp (B, T-1), entropy (B, T-1), extra loss inputs ({} or {"values": (B, T-1)})."""
        input_ids = chunk.input_ids
        packed = pack_batch(self.model, input_ids, chunk.mask, chunk.prompt_len) if self.packs else None
        shared = self.critic is not None and self.critic.shared
        with capture_hidden(self.model) if shared else nullcontext([]) as hidden, autocast(self.precision):
            new_logp, entropy = per_token_logp(self.model, input_ids, self.temperature, with_entropy=True,
                                               packed=packed)
        if self.critic is None:
            return new_logp, entropy, {}
        with autocast(self.precision):
            values = self.critic(input_ids, hidden[-1] if hidden else None)
        return new_logp, entropy, {"values": values.float()}

    def train_step(self, batch: Batch, loss_fn: LossFn) -> dict:
        self.model.train()
        if self.critic is not None:
            self.critic.train()
        steps, check, log_ratios, nonfinite, stale = [], {}, [], 0, []
        per_version = self.mini_batches * self.epochs       # optimizer steps one train step makes
        for _ in range(self.epochs):
            for mb in batch.minibatches(self.mini_batches, self.generator):
                stale.append((self.version - mb.version).double() * per_version + len(steps))   # (b,) rows
                m = self.accumulate_grads(mb, loss_fn, check if not steps else None, log_ratios)
                m["grad/norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip))
                m["grad/norm_max"] = m["grad/norm"]
                if self.critic is not None:
                    m["grad/norm_critic"] = float(torch.nn.utils.clip_grad_norm_(self.critic.parameters(),
                                                                                 self.grad_clip))
                if all(math.isfinite(m.get(k, 0.0)) for k in ("loss", "grad/norm", "grad/norm_critic")):
                    self.opt.step()
                else:   # one NaN/inf step would poison AdamW's moments for good: drop its gradients instead
                    nonfinite += 1
                self.opt.zero_grad(set_to_none=True)
                if self.sched is not None:
                    self.sched.step()
                steps.append(m)
        self.version += 1
        out = _mean_over_steps(steps)
        out["train/optimizer_steps"] = float(len(steps) - nonfinite)
        out["step/nonfinite"] = float(nonfinite)
        out["lr"] = self.opt.param_groups[0]["lr"]
        if self.precision == "bf16":
            out["trainer/bf16_native"] = float(bf16_path() != "emulated")
        out |= ratio_stats(torch.cat(log_ratios)) if log_ratios else {}
        stale = torch.cat(stale)
        out["staleness/mean"], out["staleness/max"] = stale.mean().item(), stale.max().item()
        if check:
            out["check/logp_mismatch"] = check["check/logp_mismatch"]
            out["check/logp_mismatch_mean"] = check["check/logp_mismatch_sum"] / max(check["check/logp_tokens"], 1.0)
        return out

    @torch.no_grad()
    def logp(self, batch: Batch) -> torch.Tensor:
        """(B, T-1) log-probs under the current weights, no grad (for checks and tests)."""
        return per_token_logp(self.model, batch.input_ids, self.temperature)

    def state_dict(self) -> dict:
        """Everything but the policy's weights (those go to safetensors); the critic's weights included."""
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict() if self.sched else None,
                "generator": self.generator.get_state(), "version": self.version,
                "critic": {k: v.clone() for k, v in self.critic.state_dict().items()} if self.critic else None}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("critic") is None) != (self.critic is None):
            raise ValueError("checkpoint and trainer disagree on having a critic (algorithm changed since the "
                             "checkpoint?)")
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and state["scheduler"] is not None:
            self.sched.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.version = state["version"]
