"""Variable-length ("varlen") packing for the trainer and the reference: no padding in any GEMM (issue 14).

`pack_rows` (rlpt.framework.trajectory) lays rows end to end in bins of a fixed capacity; the bins' tails are
padding (13-23 % of the slots on bench/vs_trl.py's batches) and the block-diagonal mask makes attention run over
every key of a bin. Here the tokens are one flat list instead, each group's shared prompt stored once:

    tokens  (N,)   every token a trained row needs, a group's prompt once, then each row's own tokens
    gather  (R, T) for each kept row and each of its columns, the flat token sitting there (past the row's end:
                   its last token, a harmless filler: attention is causal and those columns are never read)
    rep     (N,)   one (row, column) slot of R·T where each flat token sits (a prompt token: its group's first row)

gpt_mini's forward (`row_index=gather, token_slot=rep`) runs the embedding, the norms and every projection on
the N flat tokens, and only attention in the (R, T) row layout: q, k, v gathered into rows, plain causal SDPA
(no mask tensor: a row attends to its prompt and to itself, as in its own padded forward), the output taken back
at `rep`. A prompt's keys and values receive the gradient of every row that reads them (index_select's backward
adds), exactly the shared-prefix tree's gradient. Each row's log-probs equal its own padded forward's to fp32
rounding (different GEMM shapes), as `pack_rows`' do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Varlen:
    """Where each row of a padded (B, T) batch sits in the flat layout (module doc)."""
    input_ids: torch.Tensor     # (N,) the flat tokens
    positions: torch.Tensor     # (N,) each token's position within its row (its column)
    gather: torch.Tensor        # (R, Tr) flat index of each kept row's token at each column
    rep: torch.Tensor           # (N,) flat index into (R·Tr) of one slot holding each token
    src: torch.Tensor           # (M,) flat token whose logits predict a kept target
    dst: torch.Tensor           # (M,) the same target's flat index into the padded (B·(T-1)) layout
    targets: torch.Tensor       # (M,) the token predicted there
    shape: tuple[int, int]      # (B, T-1)

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())

    def logits(self, model) -> torch.Tensor:
        """(N, V): the model's logits at every flat token."""
        return model(self.input_ids, positions=self.positions, row_index=self.gather, token_slot=self.rep)


def supports_varlen(model) -> bool:
    """Whether `model`'s forward takes row_index= and token_slot= (gpt_mini does)."""
    return bool(getattr(model, "supports_varlen", False))


def varlen_rows(input_ids: torch.Tensor, lengths: torch.Tensor, prefix_len: torch.Tensor | None = None) -> Varlen:
    """The first `lengths[b]` tokens of each row of `input_ids` (B, T) as one flat list; rows of length ≤ 1 predict
    nothing and are left out. With `prefix_len` (B,), rows that start with the same prompt share one copy of it (a
    row shorter than its prompt shares what it has)."""
    B, T = input_ids.shape
    n = lengths.tolist()
    if max(n, default=0) > T:
        raise ValueError(f"varlen_rows(): a row length of {max(n)} exceeds the batch's {T} columns")
    rows = [b for b in range(B) if n[b] > 1]
    ids_list = input_ids.tolist()
    pl = prefix_len.tolist() if prefix_len is not None else [0] * B
    groups: dict[tuple, list[int]] = {}
    for b in rows:
        p = min(int(pl[b]), n[b] - 1)
        groups.setdefault(tuple(ids_list[b][:p]), []).append(b)
    # per kept row: the flat start of its prompt, the prompt length, the flat start of its own tokens, first-of-group
    order, p_start, p_len, own, first = [], [], [], [], []
    at = 0
    for key, members in groups.items():
        p, start = len(key), at
        at += p
        for i, b in enumerate(members):
            order.append(b)
            p_start.append(start)
            p_len.append(p)
            own.append(at)
            first.append(i == 0)
            at += n[b] - p
    N, R = at, len(order)
    Tr = max((n[b] for b in order), default=1)
    row = torch.tensor(order, dtype=torch.long)
    length = torch.tensor([n[b] for b in order], dtype=torch.long)[:, None]              # (R, 1)
    p = torch.tensor(p_len, dtype=torch.long)[:, None]
    cols = torch.arange(Tr)[None, :]
    c = torch.minimum(cols, length - 1)                                                 # past the end: last token
    prompt_at, own_at = (torch.tensor(x, dtype=torch.long)[:, None] for x in (p_start, own))
    gather = torch.where(c < p, prompt_at + c, own_at + c - p)                          # (R, Tr)
    inside = cols < length
    owner = inside & ((cols >= p) | torch.tensor(first, dtype=torch.bool)[:, None])    # one slot per flat token
    flat = gather[owner]
    slot = (torch.arange(R)[:, None] * Tr + cols).expand(R, Tr)[owner]
    rep = torch.empty(N, dtype=torch.long)
    rep[flat] = slot
    tokens = torch.empty(N, dtype=input_ids.dtype)
    src_rows = row[:, None].expand(R, Tr)
    tokens[flat] = input_ids[src_rows[owner], cols.expand(R, Tr)[owner]]
    positions = torch.empty(N, dtype=torch.long)
    positions[flat] = cols.expand(R, Tr)[owner]
    predicts = cols < length - 1                                                        # (R, Tr): has a next token
    t_row, t_col = src_rows[predicts], cols.expand(R, Tr)[predicts]
    return Varlen(input_ids=tokens, positions=positions, gather=gather, rep=rep, src=gather[predicts],
                  dst=t_row * (T - 1) + t_col, targets=input_ids[t_row, t_col + 1], shape=(B, T - 1))
