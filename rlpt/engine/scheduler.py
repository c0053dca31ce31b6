"""Continuous-batching scheduler: which tokens of which sequences go into this step's one forward.

    each step:  budget = max_num_batched_tokens
                running (oldest first): decode 1 (+k speculative) token, or the next prefill chunk;
                    out of blocks -> preempt the newest running sequence (drop its K/V, recompute later)
                waiting (FIFO, only if nobody was preempted): prefix-cache lookup, then admit a prefill
                    chunk of min(uncached tokens, budget left) if blocks allow

This is vLLM v1's unified scheme (Yu et al. 2022 Orca for iteration-level batching; Agrawal et al. 2024
Sarathi for chunked prefill): a sequence is just `num_computed` of `num_tokens`, so a decode is a
1-token chunk, a long prompt is spread over several steps without stalling the decodes beside it,
and a finished sequence's slot is refilled on the very next step. Preemption is by recompute: the
victim's blocks are released (into the prefix cache when it is on, so they are reused if nobody
needed them) and its prompt + output so far is prefilled again on re-admission. Nothing it samples
changes, because draws depend only on (seed, output index).

Speculative tokens count against the token budget; `max_num_seqs` bounds the sequences per step
(forks of an n-sample request may exceed it for a while: the extra ones wait their turn).

    pytest tests/test_engine.py -k "pressure or chunked"     # preemption and chunked prefill, token for token
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rlpt.engine.block_manager import BlockManager
from rlpt.engine.radix_cache import RadixCache
from rlpt.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int                    # seq.num_computed when scheduled
    n_tokens: int                 # tokens of seq.token_ids fed from `start`
    k: int = 0                    # speculative tokens to propose and verify (decodes only)
    draft: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so its last logits give a new token."""
        return self.start + self.n_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    copies: list[tuple[int, int]]     # copy-on-write block copies to do before the forward


class Scheduler:
    def __init__(self, bm: BlockManager, cache: RadixCache | None, max_num_seqs: int,
                 max_num_batched_tokens: int, num_spec_tokens: int = 0):
        self.bm, self.cache = bm, cache
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.num_spec_tokens = num_spec_tokens
        self.watermark = max(1, bm.num_blocks // 100)   # free blocks kept back at admission (vLLM's 1%)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget, out, copies, preempted = self.max_num_batched_tokens, [], [], False
        bs, blocks, spec = self.bm.block_size, self.bm.blocks, self.num_spec_tokens
        i = 0
        while i < len(self.running) and budget > 0 and len(out) < self.max_num_seqs:
            seq = self.running[i]
            nc, table = seq.num_computed, seq.block_table
            left = seq.num_tokens - nc
            if left == 1 and not spec and nc // bs < len(table) and blocks[table[nc // bs]].ref_count == 1:
                out.append(ScheduledSeq(seq, nc, 1))      # fast path: a decode into a block it owns
                budget -= 1
                i += 1
                continue
            k = 0
            if left == 1 and self.num_spec_tokens:
                k = max(0, min(self.num_spec_tokens, seq.request.max_output - seq.num_output - 1, budget - 1))
            n = min(left, budget)
            end = seq.num_computed + n + k
            while self.bm.blocks_needed(seq.block_table, seq.num_computed, end) > self.bm.num_available:
                victim = self.running[-1]          # lowest priority: the most recently admitted
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                copies += self.bm.prepare_write(seq.block_table, seq.num_computed, end)
                out.append(ScheduledSeq(seq, seq.num_computed, n, k))
                budget -= n + k
                i += 1
        while (self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs
               and len(out) < self.max_num_seqs):
            seq = self.waiting[0]
            m, table = 0, []
            if self.cache is not None:                # never the whole sequence: its last token gives logits
                m, table = self.cache.match_prefix(seq.token_ids[:-1])
                table = self.bm.share(table)          # hold the hit before anything can evict it
            n = min(seq.num_tokens - m, budget)
            reserve = self.watermark if self.running else 0       # a lone sequence may use every block
            if self.bm.blocks_needed(table, m, m + n) > self.bm.num_available - reserve:
                self.bm.release(table)
                break
            if self.cache is not None:
                self.cache.record(seq.num_tokens - 1, m)
            copies += self.bm.prepare_write(table, m, m + n)
            seq.block_table, seq.num_computed, seq.draft_computed = table, m, 0
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            out.append(ScheduledSeq(seq, m, n))
            budget -= n
        return SchedulerOutput(out, copies)

    def _cache_and_release(self, seq: Sequence) -> None:
        if self.cache is not None and seq.num_computed:
            self.cache.insert(seq.token_ids[:seq.num_computed], seq.block_table)
        self.bm.release(seq.block_table)

    def preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the K/V (cached if possible), back to the front of the queue."""
        self.running.remove(seq)
        self._cache_and_release(seq)
        seq.num_computed = seq.draft_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        self.running.remove(seq)
        self._cache_and_release(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares every block of parent (the prompt); its first write copies the partial block."""
        child.block_table = self.bm.share(parent.block_table)
        child.num_computed, child.draft_computed = parent.num_computed, parent.draft_computed
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def cache_prompt(self, seq: Sequence) -> None:
        """Index a just-prefilled prompt's full blocks (never the partial one it keeps writing into)."""
        if self.cache is not None:
            full = seq.num_computed // self.bm.block_size * self.bm.block_size
            self.cache.insert(seq.token_ids[:full], seq.block_table)

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop unfinished sequences (an exception mid-generate): their blocks go back, nothing leaks."""
        for seq in seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
                self.bm.release(seq.block_table)
            elif seq in self.waiting:
                self.waiting.remove(seq)
            seq.status = SequenceStatus.FINISHED
