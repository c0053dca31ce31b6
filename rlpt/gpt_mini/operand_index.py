"""Operand-index embeddings' indices (gpt_mini's `model.operand_index`; the Abacus idea, McLeish et al. 2024).

A token's operand index is how many `+` come before it (itself included) in its own part of the sequence: the
prompt up to `>`, or the response after it. In "<3+4+5>3+4=7,7+5=12#" the prompt's 3 is 0, its 4 and 5 are 1 and
2; in the response the step that adds operand i (`+4`, `+5`) carries index i, and so does the rest of that step.
Writing step i means finding the prompt operand with the same index: a match by content, not by a distance
counted from the prompt's end, which is what a plain decoder learns and what breaks on longer prompts
(docs/pipeline.md). SFT adds one random offset per row to every index (sft.operand_offset), so rows of every
index up to model.operand_index - 1 are trained although its prompts have at most 4 operands.
"""
from __future__ import annotations

import torch

from rlpt.gpt_mini.tokenizer import ALPHABET

PLUS_ID, CLOSE_ID = ALPHABET.index("+"), ALPHABET.index(">")


def _segmented_cumsum(v: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Inclusive cumsum of v (B, T) along T that restarts wherever `starts` (B, T) is True."""
    cs = v.cumsum(1)
    col = torch.arange(v.shape[1], device=v.device).expand_as(v)
    first = torch.where(starts, col, torch.zeros_like(col)).cummax(1).values
    return cs - (cs - v).gather(1, first)


def operand_index(ids: torch.Tensor, starts: torch.Tensor | None = None, state: torch.Tensor | None = None,
                  prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (B, T) -> (index (B, T), response (B, T) bool, state (B, 3)).

    `starts` (B, T): where a new sequence begins (packed rows); `state` (B, 3): the counts (after `>`, prompt `+`,
    response `+`) of the tokens before ids (a KV cache's next chunk); `prefix` (B, T, 3): counts to add per token
    (a shared-prefix branch sees the prefix's). The returned state is the counts after ids' last column."""
    close, plus = (ids == CLOSE_ID).long(), (ids == PLUS_ID).long()
    if starts is None:
        starts = torch.zeros_like(ids, dtype=torch.bool)
        starts[:, 0] = True
    seen_close = _segmented_cumsum(close, starts) - close            # '>' strictly before the token
    if state is not None:
        seen_close = seen_close + state[:, :1]
    if prefix is not None:
        seen_close = seen_close + prefix[..., 0]
    resp = seen_close > 0
    counts = [_segmented_cumsum(plus * ~resp, starts), _segmented_cumsum(plus * resp, starts)]
    for j in (0, 1):
        if state is not None:
            counts[j] = counts[j] + state[:, j + 1:j + 2]
        if prefix is not None:
            counts[j] = counts[j] + prefix[..., j + 1]
    index = torch.where(resp, counts[1], counts[0])
    new_state = torch.stack([(seen_close + close)[:, -1], counts[0][:, -1], counts[1][:, -1]], 1)
    return index, resp, new_state


def operand_index_list(tokens: list[int]) -> tuple[list[int], list[int]]:
    """operand_index for one token list in plain Python (the engine's per-sequence path): (index, response)."""
    index, resp = [], []
    after = prompt = response = 0
    for t in tokens:
        if after:
            response += t == PLUS_ID
        else:
            prompt += t == PLUS_ID
        index.append(response if after else prompt)
        resp.append(after)
        after = after or int(t == CLOSE_ID)
    return index, resp


def _branch_prefix(values: torch.Tensor, segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """Per token of a branch (> 0), the sum of `values` (B, T, C) over its segment's shared prefix (branch 0)."""
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (branch_ids[:, None, :] == 0)   # (B, T, T)
    total = torch.einsum("bij,bjc->bic", same.to(values.dtype), values)
    return total * (branch_ids > 0)[..., None]


def packed_operand_index(ids: torch.Tensor, segment_ids: torch.Tensor,
                         branch_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """operand_index of packed rows (B, T): counts restart with every segment, and a branch (> 0) of a shared-prefix
    tree starts from its prefix's (branch 0) counts -> (index, response)."""
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    if branch_ids is None:
        return operand_index(ids, starts)[:2]
    starts[:, 1:] |= branch_ids[:, 1:] != branch_ids[:, :-1]
    _, resp, _ = operand_index(ids, starts)                    # right for the shared prefixes (branch 0)
    plus = (ids == PLUS_ID).long()
    counts = torch.stack([(ids == CLOSE_ID).long(), plus * ~resp, plus * resp], -1)
    return operand_index(ids, starts, prefix=_branch_prefix(counts, segment_ids, branch_ids))[:2]
