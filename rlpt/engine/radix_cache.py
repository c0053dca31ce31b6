"""Radix-tree prefix cache over the paged blocks (SGLang's RadixAttention index, Zheng et al. 2024).

    match(tokens) = longest m such that tokens[:m] is a path in the tree;  a new request then computes only tokens[m:]

Each edge holds a run of tokens and, per token, the physical block its K/V lives in (token p sits at
offset p % block_size of that block). Matching is token-granular, not block-aligned as in vLLM's
automatic prefix caching: a hit that ends mid-block shares that block too, and the sequence's first
write copies it (copy-on-write), so a multi-turn prompt that extends an old conversation reuses every
token, not just whole blocks. Invariant that makes one block per block index enough: the block of a
path's token p also holds valid K/V for the path's tokens before p in the same block, so the block table
of a hit takes, for block index j, the block of the last matched token in that block.

The tree holds a reference on each block it indexes; blocks held by the tree alone are evicted
least-recently-used, leaf first, when the allocator runs dry. Metrics: `prefix_cache/hit_rate` =
matched prompt tokens / looked-up prompt tokens.

    cache = RadixCache(block_manager); m, table = cache.match_prefix(tokens); cache.insert(tokens, table)
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from rlpt.engine.block_manager import BlockManager, cdiv


@dataclass(eq=False)
class Node:
    key: list[int]                      # tokens on the edge into this node
    blocks: list[int]                   # physical block of each of those tokens
    parent: Node | None = None
    children: dict[int, Node] = field(default_factory=dict)
    last_access: int = 0


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class RadixCache:
    def __init__(self, bm: BlockManager):
        self.bm = bm
        bm.cache = self
        self.root = Node([], [])
        self.clock = itertools.count(1)
        self.queries = self.query_tokens = self.hit_tokens = self.evicted_blocks = 0

    def _walk(self, tokens: list[int]) -> tuple[int, list[int]]:
        """Longest cached prefix of `tokens`: its length and the block of each of its tokens."""
        node, pos, tok_blocks, now = self.root, 0, [], next(self.clock)
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            k = _common(child.key, tokens[pos:])
            child.last_access = now
            tok_blocks += child.blocks[:k]
            pos += k
            if k < len(child.key):
                break
            node = child
        return pos, tok_blocks

    def match_prefix(self, tokens: list[int]) -> tuple[int, list[int]]:
        """(m, block table covering tokens[:m]); the caller takes its own references."""
        m, tok_blocks = self._walk(tokens)
        bs = self.bm.block_size
        return m, [tok_blocks[min((j + 1) * bs, m) - 1] for j in range(cdiv(m, bs))]

    def record(self, query_tokens: int, hit_tokens: int) -> None:
        """Count a lookup that was used (an admission), for the hit-rate metric."""
        self.queries += 1
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens

    def insert(self, tokens: list[int], table: list[int]) -> None:
        """Index tokens (whose K/V are computed) with the blocks of `table` that hold them."""
        node, pos, n, bs, now = self.root, 0, len(tokens), self.bm.block_size, next(self.clock)
        while pos < n:
            child = node.children.get(tokens[pos])
            if child is None:
                new = Node(tokens[pos:], [table[p // bs] for p in range(pos, n)], node, last_access=now)
                node.children[tokens[pos]] = new
                for b in set(new.blocks):
                    self.bm.cache_hold(b)
                return
            k = _common(child.key, tokens[pos:])
            child.last_access = now
            if pos + k == n:                   # already cached (possibly ending mid-edge)
                return
            if k < len(child.key):
                child = self._split(child, k)
            node, pos = child, pos + k

    def _split(self, child: Node, k: int) -> Node:
        """Cut child's edge after k tokens; return the new upper node."""
        upper = Node(child.key[:k], child.blocks[:k], child.parent, {child.key[k]: child}, child.last_access)
        upper.parent.children[child.key[0]] = upper
        child.key, child.blocks, child.parent = child.key[k:], child.blocks[k:], upper
        for b in set(upper.blocks) & set(child.blocks):     # a block now indexed by both halves
            self.bm.cache_hold(b)
        return upper

    def _leaves(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                out.append(node)
        return out

    def evict(self, num_blocks: int) -> int:
        """Drop least-recently-used leaves until `num_blocks` blocks are free again; returns how many were."""
        heap = [(n.last_access, id(n), n) for n in self._leaves()]
        heapq.heapify(heap)
        freed = 0
        while freed < num_blocks and heap:
            _, _, node = heapq.heappop(heap)
            before = self.bm.num_free
            del node.parent.children[node.key[0]]
            for b in set(node.blocks):
                self.bm.cache_release(b)
            freed += self.bm.num_free - before
            parent = node.parent
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        self.evicted_blocks += freed
        return freed

    def reset(self) -> None:
        """Forget everything (e.g. after a weight update: the cached K/V belong to the old weights)."""
        self.evict(self.bm.num_blocks + 1)

    def num_tokens(self) -> int:
        total, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            total += len(node.key)
            stack.extend(node.children.values())
        return total

    def metrics(self) -> dict:
        return {"prefix_cache/queries": self.queries, "prefix_cache/query_tokens": self.query_tokens,
                "prefix_cache/hit_tokens": self.hit_tokens,
                "prefix_cache/hit_rate": self.hit_tokens / self.query_tokens if self.query_tokens else 0.0,
                "prefix_cache/evicted_blocks": self.evicted_blocks, "prefix_cache/tokens": self.num_tokens()}
