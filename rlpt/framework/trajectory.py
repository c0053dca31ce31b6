"""The data contract: what flows between the roles.

    Trajectory  response-local, one sample:      prompt_ids, response_ids, response_mask (R,), old_logp (R,), ...
    Batch       full-sequence, padded, aligned:  input_ids (B, T); every per-token tensor (B, T-1)

Column j of a (B, T-1) tensor is about token j+1 predicted from tokens ≤ j, the layout of
`per_token_logp(model, input_ids)`. Response token i of a trajectory with a P-token prompt sits at
full position P+i, so its log-prob lives in column P+i-1. That shift is the likeliest off-by-one
in an RL system (lesson 05's traps); `response_slice` is the one place it is written, and
`pad_sequences` (which `collate` calls) the one function that pads.

Aggregation denominators (`agg_tokens`, `agg_seqs`) are fixed when a batch is made and kept by its
micro-batch chunks, so the sum of chunk losses equals the whole batch's loss exactly.

`group`, `version`, `finish_reason` and `degenerate` are typed fields every role reads; `info` holds
only what a verifier or the agent loop adds (correct, text, turns, tool counts).

`version` is the version of the weights a trajectory was sampled with: the trainer's version (its number of
train steps) that the rollout's weights were synced from, so the number of weight syncs the sampling weights
had received when every train step is synced (sync.every = 1). Staleness in optimizer steps is computed from it
by the trainer: (trainer.version − version) × mini_batches × epochs + mini-batch index.

Algorithm-specific per-token tensors (PPO's old values and returns) travel in `Trajectory.extra`
(R,) and come out of `collate` in `Batch.extra` (B, T-1), shifted like `old_logp`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from rlpt.framework.varlen import Varlen, supports_varlen, varlen_rows


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: torch.Tensor            # (R,) 1 = sampled by the policy (EOS included); 0 = tool output / after EOS
    old_logp: torch.Tensor                 # (R,) at sampling time, from the distribution sampled from; 0 where mask 0
    ref_logp: torch.Tensor | None = None   # (R,) filled by the reference
    reward: float = 0.0
    advantage: float | torch.Tensor = 0.0  # scalar (broadcast over the response) or (R,) per token (PPO)
    group: int = -1                        # which prompt's group of K it belongs to (numbered per step)
    version: int = 0                       # version of the rollout weights it was sampled with (module doc)
    finish_reason: str = ""                # "stop" (EOS) | "length" | "max_turns" | "error" (multi-turn)
    degenerate: bool = False               # set by the algorithm: its group carries no gradient, dropped before collate
    info: dict = field(default_factory=dict)   # the verifier's and the agent loop's extras: correct, text, turns, ...
    extra: dict = field(default_factory=dict)  # name -> (R,) per-token algorithm tensor (PPO: values, returns)

    def __post_init__(self):
        R = len(self.response_ids)
        if self.response_mask.shape != (R,) or self.old_logp.shape != (R,):
            raise ValueError(f"trajectory tensors must have shape ({R},): response_mask "
                             f"{tuple(self.response_mask.shape)}, old_logp {tuple(self.old_logp.shape)}")


@dataclass
class Batch:
    input_ids: torch.Tensor        # (B, T) prompt + response, right-padded
    mask: torch.Tensor             # (B, T-1) 1 where the target token is a trainable response token
    old_logp: torch.Tensor         # (B, T-1)
    ref_logp: torch.Tensor         # (B, T-1)
    advantage: torch.Tensor        # (B, T-1) scalar advantages broadcast over each response
    reward: torch.Tensor           # (B,)
    prompt_len: torch.Tensor       # (B,)
    version: torch.Tensor          # (B,) version of the weights each row was sampled with
    agg_tokens: float              # Σ mask over the whole (mini-)batch this chunk belongs to
    agg_seqs: float                # number of sequences in that (mini-)batch
    extra: dict = field(default_factory=dict)   # algorithm-specific (B, T-1) tensors, e.g. PPO's values/returns

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor, renormalize: bool) -> Batch:
        """Rows `rows`; `renormalize=True` makes it a batch of its own (a PPO mini-batch),
        False keeps the parent's denominators (a gradient-accumulation chunk)."""
        sub = {k: getattr(self, k)[rows] for k in ("input_ids", "mask", "old_logp", "ref_logp", "advantage",
                                                    "reward", "prompt_len", "version")}
        m = sub["mask"]
        norm = dict(agg_tokens=float(m.sum()), agg_seqs=float(m.shape[0])) if renormalize else \
            dict(agg_tokens=self.agg_tokens, agg_seqs=self.agg_seqs)
        return replace(self, **sub, **norm, extra={k: v[rows] for k, v in self.extra.items()})

    def chunks(self, micro_batch_size: int) -> list[Batch]:
        """Gradient-accumulation chunks of at most `micro_batch_size` rows (0 = one chunk)."""
        if micro_batch_size <= 0 or micro_batch_size >= self.size:
            return [self]
        idx = torch.arange(self.size)
        return [self.select(idx[i:i + micro_batch_size], renormalize=False)
                for i in range(0, self.size, micro_batch_size)]

    def bucketed(self, micro_batch_size: int, lengths: torch.Tensor) -> list[Batch]:
        """Length-bucketed chunks: rows sorted by `lengths` (B,) (the tokens each needs), `micro_batch_size` at
        a time (0 = one chunk), each cut to its own longest row, so short rows are not padded to the longest of
        the batch. Denominators are kept, as in `chunks`."""
        order = torch.sort(lengths, descending=True, stable=True).indices
        size = micro_batch_size if micro_batch_size > 0 else self.size
        out = []
        for i in range(0, self.size, size):
            rows = order[i:i + size]
            out.append(self.select(rows, renormalize=False).trim(max(int(lengths[rows].max()), 2)))
        return out

    def trim(self, n_tokens: int) -> Batch:
        """The first `n_tokens` columns of input_ids (and n_tokens − 1 of every (B, T-1) tensor)."""
        c = n_tokens - 1
        sub = {k: getattr(self, k)[:, :c] for k in ("mask", "old_logp", "ref_logp", "advantage")}
        return replace(self, input_ids=self.input_ids[:, :n_tokens], **sub,
                       extra={k: v[:, :c] for k, v in self.extra.items()})

    def minibatches(self, n: int, generator: torch.Generator | None = None) -> list[Batch]:
        """`n` shuffled mini-batches, each normalised on its own (one optimizer step each)."""
        if n <= 1:
            return [self]
        perm = torch.randperm(self.size, generator=generator)
        return [self.select(part, renormalize=True) for part in perm.chunk(n) if len(part)]


def response_slice(prompt_len: int, response_len: int) -> slice:
    """Columns of a (B, T-1) tensor that hold a row's response tokens: response token i of a row with a
    P-token prompt sits at position P+i, so it is predicted at column P+i-1. The one place that shift is written."""
    return slice(prompt_len - 1, prompt_len - 1 + response_len)


def pad_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                  masks: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + response rows -> input_ids (B, T) right-padded, and mask (B, T-1) over the response.

    `masks` (per row: a tensor or list of length R, or None for all ones) lets a row weigh its response
    tokens, e.g. 0 on a tool's reply. Every job that pads sequences (collate, SFT, preference pairs, the
    reward model, the judge) calls this.
    """
    if not prompts:
        raise ValueError("pad_sequences() got no rows")
    B = len(prompts)
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T - 1)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        P, R = len(p), len(r)
        ids[b, :P + R] = torch.tensor(list(p) + list(r), dtype=torch.long)
        m = masks[b] if masks is not None else None
        if m is not None and len(m) != R:
            raise ValueError(f"row {b}: a response mask of {len(m)} entries for {R} response tokens")
        mask[b, response_slice(P, R)] = 1.0 if m is None else torch.as_tensor(m, dtype=torch.float32)
    return ids, mask


def collate(trajs: list[Trajectory], pad_id: int) -> Batch:
    """Response-local trajectories -> one padded full-sequence Batch aligned to (B, T-1)."""
    if not trajs:
        raise ValueError("collate() got no trajectories")
    ids, mask = pad_sequences([t.prompt_ids for t in trajs], [t.response_ids for t in trajs], pad_id,
                              masks=[t.response_mask for t in trajs])
    T = ids.shape[1]
    advantages = [t.advantage if torch.is_tensor(t.advantage) else torch.full((len(t.response_ids),),
                                                                               float(t.advantage)) for t in trajs]
    return Batch(input_ids=ids, mask=mask, old_logp=_columns(trajs, T, [t.old_logp for t in trajs]),
                 ref_logp=_columns(trajs, T, [t.ref_logp for t in trajs]),
                 advantage=_columns(trajs, T, advantages), extra=_collate_extra(trajs, T),
                 reward=torch.tensor([float(t.reward) for t in trajs]),
                 prompt_len=torch.tensor([len(t.prompt_ids) for t in trajs]),
                 version=torch.tensor([t.version for t in trajs]),
                 agg_tokens=float(mask.sum()), agg_seqs=float(len(trajs)))


def _columns(trajs: list[Trajectory], T: int, values: list[torch.Tensor | None]) -> torch.Tensor:
    """One (R,) tensor per trajectory (None: zeros) -> (B, T-1) at its response columns, 0 where mask is 0."""
    out = torch.zeros(len(trajs), T - 1)
    for b, (t, v) in enumerate(zip(trajs, values)):
        if v is not None:
            out[b, response_slice(len(t.prompt_ids), len(t.response_ids))] = v * t.response_mask
    return out


def _collate_extra(trajs: list[Trajectory], T: int) -> dict:
    """Each trajectory's `extra` (R,) tensors -> (B, T-1), aligned and masked like old_logp."""
    keys = set(trajs[0].extra)
    if any(set(t.extra) != keys for t in trajs):
        raise ValueError(f"collate(): trajectories carry different extra tensors: "
                         f"{sorted({k for t in trajs for k in t.extra})}")
    for t in trajs:
        for k, v in t.extra.items():
            if v.shape != (len(t.response_ids),):
                raise ValueError(f"trajectory extra[{k!r}] must have shape ({len(t.response_ids)},), "
                                 f"got {tuple(v.shape)}")
    return {k: _columns(trajs, T, [t.extra[k] for t in trajs]) for k in keys}


def per_token_logp(model, input_ids: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False, packed: Packing | Varlen | None = None):
    """log π(ids[:, j+1] | ids[:, ≤j]) -> (B, T-1); optionally also the entropy per position (B, T-1).

    `temperature` must be the rollout's: old_logp was recorded under logits / temperature
    (lesson 02's traps). With `packed` (from `pack_rows` on these ids) the forward runs on the packed
    layout and the result is scattered back to (B, T-1): equal to the padded forward's on every column
    the packing kept (each row's first `lengths` − 1), 0 on the others.
    """
    if packed is not None:
        return _packed_logp(model, packed, temperature, with_entropy)
    logits = model(input_ids)[:, :-1].float()                   # (B, T-1, V)
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)                    # (B, T-1, V)
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)   # (B, T-1)
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)         # (B, T-1)
    return logp, entropy


# -- sequence packing (lesson 22b) ------------------------------------------------------------------------
#
# A padded (B, T) batch of RL rollouts spends a third of its FLOPs on padding (prompts and responses of
# different lengths; docs/performance.md). Packing lays the rows end to end in fewer, fuller rows of `capacity`
# tokens (first-fit decreasing), each token tagged with its row (segment id) and its position within that row:
# the model's block-diagonal causal mask keeps the rows apart and RoPE restarts at 0 for each, so every row's
# log-probs equal its padded forward's (to fp32 rounding: different GEMM shapes) and their gradients too.

@dataclass
class Packing:
    """Where each row of a padded (B, T) batch sits in a packed (b, capacity) layout."""
    input_ids: torch.Tensor     # (b, L) the rows end to end, pad_id after the last
    positions: torch.Tensor     # (b, L) position of each token within its own row (0 on padding)
    segment_ids: torch.Tensor   # (b, L) the unit each token belongs to (a row, or a shared prompt and its rows); -1 pad
    branch_ids: torch.Tensor | None   # (b, L) shared prefix: 0 on the prompt, 1 + row on a row's own tokens
    src: torch.Tensor           # (M,) flat index into (b·L): the positions whose logits predict a kept target
    dst: torch.Tensor           # (M,) flat index into (B·(T-1)): the same targets' columns in the padded layout
    targets: torch.Tensor       # (M,) the token predicted there
    shape: tuple[int, int]      # (B, T-1)

    @property
    def tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())


def trained_lengths(mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) target mask -> (B,) tokens each row needs: up to its last target (column c scores token c+1, so
    c + 2 tokens), 0 for a row with none. Tokens after the last target cannot change any target's log-prob
    (attention is causal), so a trainer or scorer that reads only masked columns need not pack them."""
    cols = torch.arange(1, mask.shape[1] + 1)
    last = ((mask > 0) * cols).amax(-1)                         # (B,) last target column + 1, 0 if none
    return torch.where(last > 0, last + 1, torch.zeros_like(last))


def _first_fit(sizes: list[int], capacity: int) -> tuple[list[int], list[int]]:
    """First-fit decreasing (stable on ties) -> (bin of each item, offset of each item in its bin)."""
    used: list[int] = []
    where, offset = [0] * len(sizes), [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = next((r for r, u in enumerate(used) if u + sizes[i] <= capacity), len(used))
        if r == len(used):
            used.append(0)
        where[i], offset[i] = r, used[r]
        used[r] += sizes[i]
    return where, offset


def _spans(spans: list[tuple[int, int, int, int]]):
    """(row, first column, length, first slot) spans -> per token: row, column, slot (each (N,))."""
    row, col, n, slot = (torch.tensor([s[i] for s in spans], dtype=torch.long) for i in range(4))
    within = torch.arange(int(n.sum())) - torch.repeat_interleave(n.cumsum(0) - n, n)
    return (torch.repeat_interleave(row, n), torch.repeat_interleave(col, n) + within,
            torch.repeat_interleave(slot, n) + within)


def pack_rows(input_ids: torch.Tensor, lengths: torch.Tensor, capacity: int = 0, pad_id: int = 0,
              prefix_len: torch.Tensor | None = None) -> Packing:
    """Pack the first `lengths[b]` tokens of each row of `input_ids` (B, T) into rows of `capacity` tokens,
    first-fit decreasing; rows of length ≤ 1 predict nothing and are left out.

    With `prefix_len` (B,) (the prompt lengths), rows that start with the same prompt share one copy of it: a unit
    is that prompt followed by as many of its rows' remaining tokens as fit (the K samples of a group; DPO's
    chosen and rejected), each row attending to the prompt and to itself only (`branch_ids`). capacity 0: the
    longest row; with shared prompts, whichever of 1, 2 or 3 times the longest row needs the fewest slots (a
    longer row holds a prompt and more of its rows, but each token attends over more keys: on the recipe's
    80-row mini-batches 3x is picked and ran at least as fast as 1x, 2x and 4x)."""
    B, T = input_ids.shape
    n = [int(x) for x in lengths.tolist()]
    if prefix_len is not None and capacity == 0:   # the fewest slots of 1, 2 or 3 x the longest row (ties: shorter)
        options = [pack_rows(input_ids, lengths, c * max(max(n, default=1), 1), pad_id, prefix_len) for c in (1, 2, 3)]
        return min(options, key=lambda p: p.input_ids.numel())
    if max(n, default=0) > T:
        raise ValueError(f"pack_rows(): a row length of {max(n)} exceeds the batch's {T} columns")
    rows = [b for b in range(B) if n[b] > 1]
    L = max(capacity, max(n, default=1), 1)
    if prefix_len is None:
        units = [(0, [b]) for b in rows]                        # (prompt tokens shared, rows)
    else:
        groups: dict[tuple, list[int]] = {}
        for b in rows:
            p = min(int(prefix_len[b]), n[b] - 1)               # a row shorter than its prompt shares what it has
            groups.setdefault(tuple(input_ids[b, :p].tolist()), []).append(b)
        units = []
        for key, members in groups.items():                     # each group's rows into units of <= L tokens
            p = len(key)
            where, _ = _first_fit([n[b] - p for b in members], L - p)
            for u in range(max(where) + 1):
                units.append((p, [b for b, w in zip(members, where) if w == u]))
    sizes = [p + sum(n[b] - p for b in members) for p, members in units]
    where, offset = _first_fit(sizes, L)
    tok_spans, tgt_spans, seg, branch = [], [], [], []          # spans: (row, first column, length, first slot)
    for u, (p, members) in enumerate(units):
        start = where[u] * L + offset[u]
        if p:
            tok_spans.append((members[0], 0, p, start))
            seg.append((u, p))
            branch.append((0, p))
        slot = start + p
        for b in members:
            tok_spans.append((b, p, n[b] - p, slot))
            seg.append((u, n[b] - p))
            branch.append((b + 1, n[b] - p))
            if p:                                               # targets read from the shared prompt's slots
                tgt_spans.append((b, 0, p, start))
            tgt_spans.append((b, p, n[b] - p - 1, slot))        # and from its own (the last token predicts nothing)
            slot += n[b] - p
    nb = max(where, default=0) + 1
    ids = torch.full((nb * L,), pad_id, dtype=input_ids.dtype)
    pos = torch.zeros(nb * L, dtype=torch.long)
    seg_ids = torch.full((nb * L,), -1, dtype=torch.long)
    br_ids = torch.zeros(nb * L, dtype=torch.long)
    if tok_spans:
        row, col, flat = _spans(tok_spans)
        ids[flat], pos[flat] = input_ids[row, col], col
        seg_ids[flat] = torch.repeat_interleave(*(torch.tensor(x) for x in zip(*seg)))
        br_ids[flat] = torch.repeat_interleave(*(torch.tensor(x) for x in zip(*branch)))
        t_row, t_col, src = _spans([s for s in tgt_spans if s[2] > 0])
    else:
        t_row = t_col = src = torch.zeros(0, dtype=torch.long)
    return Packing(input_ids=ids.view(nb, L), positions=pos.view(nb, L), segment_ids=seg_ids.view(nb, L),
                   branch_ids=br_ids.view(nb, L) if prefix_len is not None else None, src=src,
                   dst=t_row * (T - 1) + t_col, targets=input_ids[t_row, t_col + 1], shape=(B, T - 1))


def supports_packing(model) -> bool:
    """Whether `model`'s forward takes positions= and segment_ids= (gpt_mini does; HF models here do not)."""
    return bool(getattr(model, "supports_packing", False))


def pack_batch(model, input_ids: torch.Tensor, mask: torch.Tensor, prefix_len: torch.Tensor) -> Packing | Varlen:
    """The tightest packed layout `model` runs for the trained columns of a batch: varlen (no padding in any
    GEMM, rlpt.framework.varlen) where its forward takes it, else `pack_rows`' bins; prompts shared either way."""
    if supports_varlen(model):
        return varlen_rows(input_ids, trained_lengths(mask), prefix_len=prefix_len)
    return pack_rows(input_ids, trained_lengths(mask), prefix_len=prefix_len)


def _packed_logp(model, p: Packing | Varlen, temperature: float, with_entropy: bool):
    if isinstance(p, Varlen):
        logits = p.logits(model)                                                        # (N, V)
    else:
        kw = {"branch_ids": p.branch_ids} if p.branch_ids is not None else {}
        logits = model(p.input_ids, positions=p.positions, segment_ids=p.segment_ids, **kw)   # (b, L, V)
    logits = logits.reshape(-1, logits.shape[-1])[p.src].float()                       # (M, V)
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)                                            # (M, V)
    logp = logp_all.gather(-1, p.targets[:, None]).squeeze(-1)                          # (M,)
    B, C = p.shape
    out = logp.new_zeros(B * C).index_put((p.dst,), logp).view(B, C)                    # (B, T-1)
    if not with_entropy:
        return out
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all).sum(-1)
        entropy = ent.new_zeros(B * C).index_put((p.dst,), ent).view(B, C)
    return out, entropy


def flatten(groups: list[list[Trajectory]]) -> list[Trajectory]:
    return [t for g in groups for t in g]


def rollout_metrics(groups: list[list[Trajectory]]) -> dict:
    """Reward and length statistics of what was sampled (before any filtering)."""
    trajs = flatten(groups)
    r = torch.tensor([t.reward for t in trajs])
    lens = torch.tensor([float(t.response_mask.sum()) for t in trajs])
    out = {"reward/mean": r.mean().item(), "reward/std": r.std().item() if len(r) > 1 else 0.0,
           "acc/train": sum(t.info.get("correct", t.reward > 0) for t in trajs) / len(trajs),
           "response/len_mean": lens.mean().item(), "response/len_max": lens.max().item(),
           "response/truncated_frac": sum(t.finish_reason == "length" for t in trajs) / len(trajs),
           "groups/degenerate_frac": sum(bool(g[0].degenerate) for g in groups) / len(groups)}
    shaped = [t.info["shaped_reward"] for t in trajs if "shaped_reward" in t.info]
    if shaped:   # an algorithm reshaped the verifier's reward (DAPO's overlong penalty)
        out["reward/shaped_mean"] = sum(shaped) / len(shaped)
    errors = sum(1 for t in trajs if "verify_error" in t.info)
    if errors:
        out["verify/errors"] = float(errors)
    return out
