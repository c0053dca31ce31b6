"""Speculative decoding with a draft model: exact rejection sampling, so outputs keep the target's law.

    draft:  d_i ~ q_i = q(· | x, d_<i),  i = 1..k          (k cheap draft forwards, batched over sequences)
    target: p_0..p_k in ONE forward over [x_last, d_1..d_k]
    accept d_i with prob min(1, p_{i-1}(d_i) / q_{i-1}(d_i)), left to right; at the first rejection j draw
    y ~ norm(max(0, p_j − q_j)); if all k pass draw a bonus y ~ p_k.    (Leviathan et al. 2023; Chen et al. 2023)

Each emitted token is then distributed exactly as p given its prefix, so its reported log-prob is
log p (the target's processed distribution), the same number the trainer recomputes. At temperature 0
both models are argmaxes: accept while d_i = argmax p_{i-1}, then emit argmax p_j, i.e. greedy target
decoding token for token. Uniforms come from the counter RNG: draft draws use stream 1, acceptance
tests stream 2, residual/bonus draws stream 0, each at the emitted token's output index.

The draft has its own paged K/V pool indexed by the same block tables (vLLM's draft worker): COW and
prefix sharing need no extra bookkeeping; it catches up lazily (`draft_computed`) on tokens it has not
seen (a prompt, the bonus token). Lesson 21: disable for RL unless kernels match; it pays at
low temperature, where drafts are accepted.

    LLM(target, tok, draft_model=draft, num_speculative_tokens=4);   pytest tests/test_engine_spec.py
"""
from __future__ import annotations

import torch

from rlpt.engine.model_runner import Chunk, ModelRunner
from rlpt.engine.sampling import draw, processed_logp_rows, sample, uniform
from rlpt.engine.scheduler import ScheduledSeq


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a rejected position is resampled from (unnormalised): the part of p that q under-covers."""
    return (p - q).clamp_(min=0)


class SpeculativeDecoder:
    def __init__(self, draft_runner: ModelRunner, num_tokens: int):
        if num_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_tokens}")
        self.runner, self.k = draft_runner, num_tokens
        self.proposed = self.accepted = 0

    def propose(self, items: list[ScheduledSeq]) -> torch.Tensor:
        """Fill each item's `draft` with k tokens; -> draft probs q (S, K, V) of each proposal."""
        K = max(it.k for it in items)
        q_all = None
        active = list(range(len(items)))                                   # rows of items still drafting
        ctx = self.runner.needs_context
        chunks = [Chunk(it.seq.token_ids[it.seq.draft_computed:], it.seq.draft_computed, it.seq.block_table, 1,
                        list(it.seq.token_ids) if ctx else None) for it in items]   # catch up, then propose d_1
        for i in range(K):
            its = [items[r] for r in active]
            logits = self.runner.run(chunks)                                # (S_active, V)
            params = [it.seq.params for it in its]
            logp = processed_logp_rows(logits, params)
            tok = sample(logp, [p.greedy for p in params], [it.seq.seed for it in its],
                         [it.seq.num_output + i for it in its], stream=1).tolist()
            if q_all is None:
                q_all = logp.new_zeros(len(items), K, logp.shape[-1])
            q_all[torch.tensor(active, device=logp.device), i] = logp.exp()
            for it, t in zip(its, tok):
                it.draft.append(t)
            active = [r for r in active if items[r].k > i + 1]
            chunks = [Chunk([items[r].draft[-1]], items[r].seq.num_tokens + i, items[r].seq.block_table, 1,
                            list(items[r].seq.token_ids) + items[r].draft if ctx else None) for r in active]
            if not active:
                break
        return q_all

    def verify(self, items: list[ScheduledSeq], logits: torch.Tensor, q: torch.Tensor
               ) -> list[tuple[list[int], list[float], torch.Tensor]]:
        """Target logits (Σ(k+1), V), rows of each item in order, and draft probs q (S, K, V)
        -> per item (emitted tokens, their log p, the p rows used (n_emitted, V))."""
        S, K, V = q.shape
        dev = logits.device
        t = lambda x: torch.tensor(x, device=dev)                          # noqa: E731
        ks = t([it.k for it in items])                                      # (S,)
        params = [it.seq.params for it in items for _ in range(it.k + 1)]
        logp_rows = processed_logp_rows(logits, params)                     # (Σ(k+1), V)
        logp = logp_rows.new_full((S, K + 1, V), float("-inf"))
        pad = t([s * (K + 1) + i for s, it in enumerate(items) for i in range(it.k + 1)])
        logp.view(S * (K + 1), V)[pad] = logp_rows
        p = logp.exp()                                                      # (S, K+1, V)
        d = t([it.draft + [0] * (K - it.k) for it in items])                # (S, K)
        greedy = t([it.seq.params.greedy for it in items])
        base = t([it.seq.num_output for it in items])
        seeds = t([it.seq.seed for it in items])
        p_d = p[:, :K].gather(2, d[:, :, None]).squeeze(2)                  # (S, K) p_{i-1}(d_i)
        q_d = q.gather(2, d[:, :, None]).squeeze(2)
        idx = base[:, None] + torch.arange(K, device=dev)                   # output index of d_i
        u = uniform(seeds[:, None].expand(S, K).reshape(-1), idx.reshape(-1), 2).view(S, K)
        ok = torch.where(greedy[:, None], d == p[:, :K].argmax(-1), u * q_d < p_d)
        ok &= torch.arange(K, device=dev) < ks[:, None]                     # nothing past each item's k
        j = ok.long().cumprod(1).sum(1)                                     # (S,) accepted drafts
        rows = torch.arange(S, device=dev)
        p_j, q_j = p[rows, j], q[rows, j.clamp(max=K - 1)]                  # (S, V)
        w = torch.where((j < ks)[:, None], residual(p_j, q_j), p_j)
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, p_j)
        last = draw(w, uniform(seeds, base + j, 0))
        last = torch.where(greedy, p_j.argmax(-1), last)                    # (S,)
        out_tok = torch.cat([d, d.new_zeros(S, 1)], 1).scatter_(1, j[:, None], last[:, None])
        out_lp = logp.gather(2, out_tok[:, :, None]).squeeze(2)             # (S, K+1) log p of each token
        jl, tl, ll = j.tolist(), out_tok.tolist(), out_lp.tolist()
        self.proposed += sum(it.k for it in items)
        self.accepted += sum(jl)
        return [(tl[s][:jl[s] + 1], ll[s][:jl[s] + 1], logp[s, :jl[s] + 1]) for s in range(S)]
