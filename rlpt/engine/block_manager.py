"""Paged KV memory: fixed-size blocks, reference counts, one free list, a block table per sequence.

    physical slot of token position p in sequence s = block_table_s[p // block_size] · block_size + p % block_size

PagedAttention (Kwon et al. 2023, vLLM): a sequence holds blocks on demand, not a max-length slab, so
nothing is reserved for tokens that are never generated and every freed block returns to one pool (no
fragmentation). Blocks are shared by reference: the n samples of one prompt point at the prompt's
blocks (`fork`), and so does a prefix-cache hit. A shared block is copied the first time a sequence
writes into it (copy-on-write): with prompt length P and G tokens generated per sample,
K samples hold ceil(P/bs) + K·(blocks for G, +1 for the partial prompt block) instead of K·ceil((P+G)/bs).

The radix prefix cache holds one reference on each block it indexes; a block held only by the cache is
"evictable" and counts as available: allocation evicts least-recently-used cache leaves when the free
list is empty.

    pytest tests/test_engine_blocks.py
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0          # sequences holding it, +1 if the prefix cache holds it
    cache_refs: int = 0         # radix-tree nodes indexing it (together they hold ONE ref_count)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.evictable: set[int] = set()      # held by the prefix cache alone
        self.cache = None                      # a RadixCache registers itself here
        self.peak_used = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_available(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self.free_ids)

    # -- reference counting -------------------------------------------------------------------
    def _sync(self, b: int) -> None:
        blk = self.blocks[b]
        if blk.cache_refs and blk.ref_count == 1:
            self.evictable.add(b)
        else:
            self.evictable.discard(b)

    def incref(self, b: int) -> None:
        self.blocks[b].ref_count += 1
        self._sync(b)

    def decref(self, b: int) -> None:
        blk = self.blocks[b]
        if blk.ref_count <= 0:
            raise RuntimeError(f"block {b} released more often than held (ref_count {blk.ref_count})")
        blk.ref_count -= 1
        if blk.ref_count == 0:
            self.free_ids.append(b)
        self._sync(b)

    def cache_hold(self, b: int) -> None:
        blk = self.blocks[b]
        blk.cache_refs += 1
        if blk.cache_refs == 1:
            self.incref(b)

    def cache_release(self, b: int) -> None:
        blk = self.blocks[b]
        blk.cache_refs -= 1
        if blk.cache_refs == 0:
            self.decref(b)
        else:
            self._sync(b)

    def _alloc(self) -> int:
        if not self.free_ids and self.cache is not None:
            self.cache.evict(1)
        if not self.free_ids:
            raise RuntimeError("out of KV blocks: the scheduler should have checked num_available")
        b = self.free_ids.popleft()
        self.blocks[b].ref_count = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return b

    # -- sequences ----------------------------------------------------------------------------
    def blocks_needed(self, table: list[int], start: int, end: int) -> int:
        """Blocks to allocate for writing positions [start, end): new ones plus copy-on-write copies."""
        bs, last = self.block_size, cdiv(end, self.block_size)
        cow = sum(self.blocks[table[j]].ref_count > 1 for j in range(start // bs, min(len(table), last)))
        return max(0, last - len(table)) + cow

    def prepare_write(self, table: list[int], start: int, end: int) -> list[tuple[int, int]]:
        """Make positions [start, end) writable: copy shared blocks, append new ones. Returns the
        (src, dst) block copies the model runner must do before the forward."""
        bs, last = self.block_size, cdiv(end, self.block_size)
        copies = []
        for j in range(start // bs, min(len(table), last)):
            b = table[j]
            if self.blocks[b].ref_count > 1:        # shared: this sequence gets its own copy
                nb = self._alloc()
                copies.append((b, nb))
                self.decref(b)
                table[j] = nb
        while len(table) < last:
            table.append(self._alloc())
        return copies

    def share(self, table: list[int]) -> list[int]:
        """A new reference to every block of `table` (fork, prefix-cache hit)."""
        for b in table:
            self.incref(b)
        return list(table)

    def release(self, table: list[int], keep: int = 0) -> None:
        """Drop the blocks of `table` from index `keep` on (all of them by default)."""
        for b in table[keep:]:
            self.decref(b)
        del table[keep:]

    def check(self, tables: list[list[int]]) -> None:
        """Invariants: each ref_count = holders (tables + cache); free list = blocks with ref_count 0."""
        held = Counter(b for t in tables for b in t)
        for blk in self.blocks:
            want = held[blk.block_id] + (1 if blk.cache_refs else 0)
            if blk.ref_count != want or blk.ref_count < 0 or blk.cache_refs < 0:
                raise AssertionError(f"block {blk.block_id}: ref_count {blk.ref_count}, holders {want}, "
                                     f"cache_refs {blk.cache_refs}")
        free = list(self.free_ids)
        if len(free) != len(set(free)) or set(free) != {b.block_id for b in self.blocks if b.ref_count == 0}:
            raise AssertionError("free list does not match the blocks with ref_count 0")
        want_ev = {b.block_id for b in self.blocks if b.cache_refs and b.ref_count == 1}
        if self.evictable != want_ev:
            raise AssertionError("evictable set does not match the blocks held by the cache alone")
