"""The engine's state: a `Request` (one prompt, n samples) holds `Sequence`s; outputs are vLLM-shaped.

    Sequence.token_ids = prompt + output;   K/V cached for token_ids[:num_computed];   block_table[j] holds
    positions [j·block_size, (j+1)·block_size)

A sequence's life: WAITING → RUNNING (prefill chunks, then one token per step) → FINISHED. Preemption
sends it back to WAITING with its K/V dropped (`num_computed = 0`); on re-admission it recomputes
prompt + output so far as one long prefill (vLLM's "recompute" preemption), and since sampling is a
function of (seed, output index) only, what it generates next is unchanged. The n samples of a
request start as one sequence (the leader); when its prompt is computed, the n first tokens are
drawn from the same logits and n-1 siblings fork its blocks (copy-on-write).
Outputs mirror vLLM's `RequestOutput` / `CompletionOutput`, plus `token_logprobs` (always filled).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from rlpt.engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()      # not started, or preempted (K/V dropped, to be recomputed)
    RUNNING = enum.auto()      # holds blocks; prefilling in chunks or decoding
    FINISHED = enum.auto()     # blocks released (its K/V may live on in the prefix cache)


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int                          # sample index j within the request
    token_ids: list[int]                # prompt + output
    prompt_len: int
    logps: list[float] = field(default_factory=list)        # per output token, from the distribution sampled
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0               # tokens whose K/V sit in the target model's cache
    draft_computed: int = 0             # the same for the draft model (speculative decoding)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None    # "stop" or "length"
    stop_reason: int | str | None = None
    text: str | None = None             # set when a stop string cut the text

    @property
    def seed(self) -> int:
        """Sample j's key: (seed · C + j) mod 2^62 with C odd, so requests with seeds s and s+1 do not
        share shifted copies of each other's samples (as plain seed + j would)."""
        return (self.request.seed * 0x9E3779B97F4A7C15 + self.index) % (1 << 62)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(eq=False)
class Request:
    request_id: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]            # EOS (unless ignore_eos) and params.stop_token_ids
    max_output: int                     # min(max_tokens, room left in the context)
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    token_logprobs: list[float]         # log-prob of each sampled token under the distribution it was drawn from
    cumulative_logprob: float
    finish_reason: str                  # "stop" or "length"
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None   # top-k per position (SamplingParams.logprobs)


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
