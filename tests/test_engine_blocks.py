"""rlpt.engine's memory: paged blocks (refcounts, free list, copy-on-write) and the radix prefix cache.

Hand-sized cases with numbers worked out in the comments; every test ends with the invariant check
(ref_count = holders, free list = unreferenced blocks) and, where nothing is held, a full pool.
"""
from __future__ import annotations

import pytest

from rlpt.engine.block_manager import BlockManager, cdiv
from rlpt.engine.radix_cache import RadixCache


def test_allocate_release_and_free_list():
    bm = BlockManager(num_blocks=8, block_size=4)
    table: list[int] = []
    assert bm.blocks_needed(table, 0, 10) == 3               # positions 0..9 -> blocks 0,1,2
    assert bm.prepare_write(table, 0, 10) == []
    assert len(table) == 3 and bm.num_free == 5 and bm.peak_used == 3
    assert bm.blocks_needed(table, 10, 12) == 0              # still inside block 2
    bm.prepare_write(table, 10, 13)                          # position 12 opens block 3
    assert len(table) == 4
    bm.check([table])
    bm.release(table, keep=2)                                # trim the tail
    assert len(table) == 2 and bm.num_free == 6
    bm.release(table)
    assert bm.num_free == 8
    bm.check([])


def test_fork_shares_and_copy_on_write_copies_only_the_written_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    parent: list[int] = []
    bm.prepare_write(parent, 0, 10)                          # a 10-token prompt: blocks [a, b, c], c half full
    kids = [bm.share(parent) for _ in range(3)]
    assert all(bm.blocks[b].ref_count == 4 for b in parent)
    copies = bm.prepare_write(kids[0], 10, 11)               # kid 0 writes position 10, inside shared block c
    assert copies == [(parent[2], kids[0][2])] and kids[0][:2] == parent[:2] and kids[0][2] != parent[2]
    assert bm.blocks[parent[2]].ref_count == 3
    bm.check([parent, *kids])
    for t in [parent, *kids]:
        bm.release(t)
    assert bm.num_free == 16
    bm.check([])


def test_sharing_accounting_k_samples():
    """K samples of a P-token prompt, G tokens each: prompt_blocks + K·(own blocks), not K·(P+G)/bs."""
    bs, P, G, K = 4, 10, 6, 16
    bm = BlockManager(num_blocks=200, block_size=bs)
    prompt: list[int] = []
    bm.prepare_write(prompt, 0, P)
    kids = [bm.share(prompt) for _ in range(K)]
    bm.release(prompt)                                       # the leader is one of the K in the engine
    for t in kids:
        bm.prepare_write(t, P, P + G)
    full_prompt_blocks = P // bs                             # 2 blocks stay shared by all K
    own = cdiv(P + G, bs) - full_prompt_blocks               # the partial prompt block (copied) + new ones
    assert bm.num_used == full_prompt_blocks + K * own       # 2 + 16·2 = 34
    assert bm.num_used < K * cdiv(P + G, bs)                 # vs 16·4 = 64 unshared
    bm.check(kids)
    for t in kids:
        bm.release(t)
    assert bm.num_free == 200


def test_release_more_than_held_raises():
    bm = BlockManager(num_blocks=2, block_size=4)
    t: list[int] = []
    bm.prepare_write(t, 0, 1)
    b = t[0]
    bm.release(t)
    with pytest.raises(RuntimeError, match="released more often"):
        bm.decref(b)


def test_check_catches_corrupted_refcount():
    bm = BlockManager(num_blocks=4, block_size=4)
    t: list[int] = []
    bm.prepare_write(t, 0, 4)
    bm.blocks[t[0]].ref_count += 1
    with pytest.raises(AssertionError, match="ref_count"):
        bm.check([t])


def _cached(bm: BlockManager, cache: RadixCache, tokens: list[int]) -> list[int]:
    """Simulate a finished sequence: write its tokens, index them, drop the sequence's own references."""
    table: list[int] = []
    bm.prepare_write(table, 0, len(tokens))
    cache.insert(tokens, table)
    kept = list(table)
    bm.release(table)
    return kept


def test_radix_match_is_token_granular_and_uses_the_last_matched_block():
    bm = BlockManager(num_blocks=32, block_size=4)
    cache = RadixCache(bm)
    a = _cached(bm, cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])      # blocks a0 a1 a2
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 99]) == (6, a[:2])       # mid-block hit: 6 tokens, 2 blocks
    b = _cached(bm, cache, [1, 2, 3, 4, 5, 6, 50, 51, 52, 53])            # diverges at position 6 (block 1)
    # A query following b's branch: block 1 must be b's (it also holds positions 4,5), not a's.
    m, table = cache.match_prefix([1, 2, 3, 4, 5, 6, 50, 51, 0])
    assert m == 8 and table == [a[0], b[1]]
    m, table = cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 0])
    assert m == 7 and table == [a[0], a[1]]
    assert cache.match_prefix([2, 2]) == (0, [])
    bm.check([])
    assert bm.num_available == 32                            # all cached blocks are evictable
    cache.reset()
    assert bm.num_free == 32 and cache.num_tokens() == 0
    bm.check([])


def test_radix_insert_is_idempotent_and_split_holds_shared_block_once_per_node():
    bm = BlockManager(num_blocks=32, block_size=4)
    cache = RadixCache(bm)
    _cached(bm, cache, [1, 2, 3, 4, 5, 6])
    before = bm.num_used
    _cached(bm, cache, [1, 2, 3, 4, 5, 6])                   # same tokens: nothing new is held
    assert bm.num_used == before
    _cached(bm, cache, [1, 2, 3, 4, 5, 9, 9])                # split at 5 (inside block 1)
    assert cache.num_tokens() == 6 + 2
    bm.check([])
    cache.reset()
    assert bm.num_free == 32


def test_radix_evicts_least_recently_used_leaf_first():
    bm = BlockManager(num_blocks=6, block_size=4)
    cache = RadixCache(bm)
    old = _cached(bm, cache, [1, 1, 1, 1, 1])                # 2 blocks
    _cached(bm, cache, [2, 2, 2, 2, 2])                      # 2 blocks
    cache.match_prefix([1, 1, 1, 1, 1])                      # touch the first: the second is now LRU
    assert bm.num_free == 2 and bm.num_available == 6
    table: list[int] = []
    bm.prepare_write(table, 0, 16)                           # needs 4 blocks: evicts the [2, ...] branch
    assert cache.match_prefix([2, 2, 2, 2, 2])[0] == 0
    assert cache.match_prefix([1, 1, 1, 1, 1])[0] == 5 and set(old) & set(bm.free_ids) == set()
    bm.check([table])
    bm.release(table)
    cache.reset()
    assert bm.num_free == 6


def test_radix_hit_rate_metric():
    bm = BlockManager(num_blocks=8, block_size=4)
    cache = RadixCache(bm)
    cache.record(10, 0)
    cache.record(10, 5)
    m = cache.metrics()
    assert m["prefix_cache/hit_rate"] == pytest.approx(0.25) and m["prefix_cache/queries"] == 2
