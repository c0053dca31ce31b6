"""Batched KV-cached sampling for any model with gpt_mini's incremental interface.

    logp = log_softmax(top_p(top_k(logits / T)));  y ~ exp(logp);  old_logp = logp[y]

The log-prob of each sampled token is taken from the very distribution it was sampled from
(temperature, top-k and top-p applied and renormalised), never recomputed (lesson 02,
its traps 1–2). Prompts of different lengths are left-padded; each row's rotary positions start at 0
at its first real token, so a row's logits do not depend on its neighbours.

This is the simple sampler; `rlpt.engine` (paged KV, continuous batching) replaces it behind the
same interface.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    tokens: list[int]                 # response tokens, including the EOS if it was produced
    logps: list[float]                # log-prob of each token under its sampling distribution
    finish_reason: str                # "stop" (EOS) or "length"


@dataclass
class SamplingParams:
    max_tokens: int = 32
    temperature: float = 1.0          # 0 = greedy (logps then come from the untempered softmax)
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off

    def __post_init__(self):
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.temperature < float("inf"):   # written so that NaN fails too
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


def processed_logp(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """(N, V) logits -> (N, V) log-probs of the distribution actually sampled from."""
    logits = logits.float()
    if sp.temperature > 0:
        logits = logits / sp.temperature
    if sp.top_k and sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps at least one)
        drop = (probs.cumsum(-1) - probs) >= sp.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return torch.log_softmax(logits, dim=-1)


def stop_set(eos) -> tuple[int, ...]:
    """The ids that end a sample: `eos` is one id, or several (a model's generation_config can list more than its
    tokenizer's EOS, e.g. a chat model's end-of-turn token)."""
    return (int(eos),) if isinstance(eos, int) else tuple(int(i) for i in eos)


def encode_prompt(tok, text: str) -> list[int]:
    """A prompt's ids as the env gives them to the policy: a model's own tokenizer through its chat template when it
    has one (rlpt.models.chat.PromptTokenizer.encode_prompt), else plain `encode` (CharTokenizer)."""
    return getattr(tok, "encode_prompt", tok.encode)(text)


def stop_ids(tok) -> tuple[int, ...]:
    """A tokenizer's stop ids: its `stop_ids` when it has them (an HF model's: rlpt.models.hf), else (eos_id,)."""
    return tuple(getattr(tok, "stop_ids", None) or (tok.eos_id,))


@torch.no_grad()
def generate(model, prompts: list[list[int]], sp: SamplingParams, eos_id: int | tuple[int, ...], pad_id: int,
             generator: torch.Generator | None = None) -> list[Sample]:
    stops = stop_set(eos_id)          # one EOS id, or several (stop_ids)
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    max_len = model.cfg.max_seq_len
    if L + 1 > max_len:
        raise ValueError(f"prompt of {L} tokens leaves no room to generate (model.max_seq_len={max_len})")
    steps = min(sp.max_tokens, max_len - L)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    real = torch.zeros(B, L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        real[i, L - len(p):] = True
    ids, real = ids.to(device), real.to(device)
    pos = (real.long().cumsum(-1) - 1).clamp(min=0)                  # (B, L) per-row positions
    cache = model.new_cache(B, L + steps)
    logits = model(ids, cache=cache, positions=pos, key_mask=real)[:, -1]   # (B, V)
    next_pos = pos[:, -1:] + 1                                        # (B, 1)
    out_tok = torch.full((B, steps), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros(B, steps, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for t in range(steps):
        logp = processed_logp(logits, sp)                             # (B, V)
        if sp.temperature == 0:
            nxt = logp.argmax(-1)
        else:
            nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out_tok[:, t] = nxt
        out_logp[:, t] = logp.gather(-1, nxt[:, None]).squeeze(-1) * (~done)
        done = done | torch.isin(nxt, torch.tensor(stops))
        n = t + 1
        if bool(done.all()) or t == steps - 1:
            break
        logits = model(nxt[:, None], cache=cache, positions=next_pos)[:, -1]
        next_pos = next_pos + 1
    model.train(was_training)
    samples = []
    for i in range(B):
        toks = out_tok[i, :n].tolist()
        k = next((j + 1 for j, t in enumerate(toks) if t in stops), n)
        samples.append(Sample(toks[:k], out_logp[i, :k].tolist(), "stop" if toks[k - 1] in stops else "length"))
    return samples


@torch.no_grad()
def sample_texts(model, tok, prompts: list[str], k: int, sp: SamplingParams,
                 generator: torch.Generator | None = None, batch: int = 512) -> list[str]:
    """k decoded samples of each prompt text, in order: prompt i's samples are [i*k:(i+1)*k].
    Batches of `batch` sequences, drawn from `generator` (a seeded one gives the same samples again)."""
    ids = [encode_prompt(tok, p) for p in prompts for _ in range(k)]
    outs = []
    for i in range(0, len(ids), batch):
        outs += generate(model, ids[i:i + batch], sp, stop_ids(tok), tok.pad_id, generator)
    return [tok.decode(o.tokens) for o in outs]
