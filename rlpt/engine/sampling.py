"""Sampling: vLLM-shaped `SamplingParams`, and a counter-based sampler whose draws depend only on
(seed, output position, stream), never on what else is in the batch.

    logp = processed_logp(logits, params)      # temperature, top-k, top-p: rlpt.gpt_mini.generate's semantics
    u    = uniform(seed_j, i, stream)          # a hash of (seed, output index i): no generator state at all
    y    = min{v : CDF_v > u}                  # inverse-CDF draw;  temperature 0: y = argmax, logp untempered

Sample j of a request with `seed` draws with the key (seed · C + j) mod 2^62 (vLLM's per-request seed,
extended to n samples; `Sequence.seed`).
Why a counter-based RNG (the Philox idea, lessons 24–25) rather than a torch.Generator per
sequence: a draw is a pure function of its coordinates, so a sequence samples the same tokens alone or
in a batch of 256, and after being preempted and recomputed; and the whole batch draws in one
vectorised call, where 256 generators would be a Python loop per token. The hash is Wellons'
`lowbias32`, chained over (seed, index, stream), two of them giving a 53-bit double.

    pytest tests/test_engine.py -k "rng or processed or batch_or_preemption"
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from rlpt.config import quote
from rlpt.gpt_mini.generate import processed_logp

_M32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    n: int = 1                        # samples per prompt; they share the prompt's KV blocks
    temperature: float = 1.0          # 0 = greedy (the reported logps then come from the untempered softmax)
    top_p: float = 1.0
    top_k: int = 0                    # 0 (or vLLM's -1) = off
    max_tokens: int = 16
    stop: str | list[str] | None = None          # stop strings: the text is cut before them
    stop_token_ids: list[int] | None = None      # extra stop tokens besides the tokenizer's EOS
    ignore_eos: bool = False
    seed: int | None = None           # None: drawn per request from the engine's generator. As in vLLM, one
                                      # seed on many requests gives them one random stream (correlated draws)
    logprobs: int | None = None       # also return the top-`logprobs` tokens' log-probs per position

    def __post_init__(self):
        """Every field's type and range, checked at construction and again by LLM.generate: a bad value is a
        ValueError naming the field (NaN compares false both ways, so each range test is written to fail on it)."""
        def bad(field, want):
            return ValueError(f"SamplingParams.{field} {want}, got {quote(getattr(self, field), 80)}")

        def is_int(x) -> bool:   # numbers.*: numpy's ints and floats count too; a bool is no count
            return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))

        def is_num(x) -> bool:
            return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))
        if not is_int(self.n) or self.n < 1:
            raise bad("n", "must be an int >= 1")
        if not is_int(self.max_tokens) or self.max_tokens <= 0:
            raise bad("max_tokens", "must be an int > 0")
        if not is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be a number in (0, 1]")
        if not is_num(self.temperature) or not 0.0 <= self.temperature < math.inf:
            raise bad("temperature", "must be a finite number >= 0")
        if self.top_k == -1:
            self.top_k = 0
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an int >= 0 (0 or -1 = off)")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2 ** 62):
            raise bad("seed", "must be None or an int in [0, 2**62)")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            raise bad("logprobs", "must be None or an int >= 0")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise bad("ignore_eos", "must be a bool")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and (not isinstance(self.stop, (list, tuple))
                                      or any(not isinstance(s, str) or not s for s in self.stop)):
            raise bad("stop", "must be None, a non-empty string or a list of them")
        if self.stop_token_ids is not None and (not isinstance(self.stop_token_ids, (list, tuple))
                                                or any(not is_int(t) or t < 0 for t in self.stop_token_ids)):
            raise bad("stop_token_ids", "must be None or a list of token ids (ints >= 0)")
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def key(self) -> tuple:
        """What the processed distribution depends on: rows with equal keys are processed together."""
        return (self.temperature, self.top_k, self.top_p)


def _hash32(x: np.ndarray) -> np.ndarray:
    """Wellons' lowbias32 on uint32 (numpy wraps the products mod 2^32): a bijection with near-ideal avalanche."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def uniform(seed, index, stream: int) -> torch.Tensor:
    """(M,) seeds (< 2^62) and output indices -> (M,) float64 uniforms in [0, 1), one per (seed, index, stream).
    Host-side numpy on uint32 (~40 us for 64 rows against ~300 for the same ~80 ops as torch int64 tensors, which
    needed the 16-bit-halves multiply to stay in range); the values are bit-identical."""
    seed = np.asarray(seed.cpu() if torch.is_tensor(seed) else seed, np.uint64)
    index = np.asarray(index.cpu() if torch.is_tensor(index) else index, np.uint64)
    lo = (seed & np.uint64(_M32)).astype(np.uint32)
    hi = (seed >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        key = _hash32(_hash32(lo) ^ hi)
        key = _hash32(key ^ (index & np.uint64(_M32)).astype(np.uint32))
        key = _hash32(key ^ np.uint32((stream * 0x9E3779B9) & _M32))
        a, b = _hash32(key ^ np.uint32(0x68E31DA4)), _hash32(key ^ np.uint32(0xB5297A4D))
    u = ((a >> np.uint32(5)).astype(np.uint64) * np.uint64(67108864) + (b >> np.uint32(6))) / 9007199254740992.0
    return torch.from_numpy(u)


def processed_logp_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """(M, V) logits, one SamplingParams per row -> (M, V) log-probs of the distribution each row samples from."""
    first = params[0]
    if all(p is first for p in params) or all(p.key == first.key for p in params):   # the common case
        return processed_logp(logits, first)
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.key, []).append(i)
    for rows in groups.values():
        idx = torch.tensor(rows, device=logits.device)
        out[idx] = processed_logp(logits[idx], params[rows[0]])
    return out


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: (M, V) non-negative weights (need not sum to 1), (M,) uniforms -> (M,) tokens.
    A zero-weight token is never drawn: its CDF step is empty."""
    cdf = probs.double().cumsum(-1)                                        # (M, V)
    x = (u * cdf[:, -1]).unsqueeze(1)                                      # (M, 1)
    return torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def sample(logp: torch.Tensor, greedy: list[bool], seeds: list[int], index: list[int], stream: int = 0) -> torch.Tensor:
    """(M, V) processed log-probs -> (M,) tokens: argmax where greedy, else an inverse-CDF draw."""
    if all(greedy):
        return logp.argmax(-1)
    tok = draw(logp.exp(), uniform(seeds, index, stream).to(logp.device))
    if any(greedy):
        g = torch.tensor(greedy, device=logp.device)
        tok = torch.where(g, logp.argmax(-1), tok)
    return tok
