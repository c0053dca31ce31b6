"""Model runner: one forward over every token scheduled this step, prefill chunks and decodes together.

    x = embed(tokens of all sequences, flattened)  (N, d);   per layer: x += o(paged_attn(rope(qkv(x))));  x += mlp(x)
    logits = lm_head(norm(x[rows that need logits]))   (M, V)

The model is read through `rlpt.engine.weights.served_model`: gpt_mini, or a Hugging Face Llama / Qwen2 /
Mistral (biases, GQA, explicit head_dim, static RoPE scaling), with a peft LoRA delta merged into the
fused weights when one is active. The batch is flat (vLLM v1 style): projections and MLPs run on (N, d)
with no padding; only attention groups tokens by sequence. A decode-only step (every sequence feeds
one token) reads K/V in place (`paged_decode_attention`); steps with prefill chunks pad queries per
sequence and gather tiles. Host-side metadata (positions, slots, block tables) is built in numpy and
moved once. The runner reads the model's own weights (embedding, norms, o / down projections, lm_head)
through plain tensor functions, no module calls, and keeps fused copies of q|k|v and gate|up so each
layer does 4 matmuls, not 7: fewer ops is what counts at this size. The fused copies are rebuilt
whenever a parameter changes (its version counter or storage) or a LoRA adapter is switched on or off,
so a trainer's in-place step or `WeightSyncer.copy_weights` is seen on the next call. RoPE is one
complex multiply on pair-interleaved q and k (see `__init__`); the residual adds ride on the o / down
projections (`addmm`).

Eager on purpose: at this size a step is ~150 op dispatches, and compiling it (whole, or vLLM's
piecewise scheme) was measured slower on this CPU; where a step's time goes, and those measurements,
are in docs/engine.md ("Where a decode step's time goes").

    logits = ModelRunner(model, num_blocks=64, block_size=16).run([Chunk([5, 6, 7], 0, [3], 1)])   # (1, V)
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rlpt.engine.block_manager import cdiv
from rlpt.engine.paged_attention import (
    PagedKVCache,
    attention_bias,
    decode_pattern,
    paged_attention,
    paged_decode_attention,
)
from rlpt.engine.weights import adapter_state, linear_weight, served_model
from rlpt.gpt_mini.operand_index import operand_index_list


@dataclass
class Chunk:
    tokens: list[int]        # tokens fed this step (their K/V get written)
    start: int               # position of tokens[0]
    block_table: list[int]   # covers positions [0, start + len(tokens))
    n_logits: int            # how many trailing positions need logits (0: mid-prefill chunk)
    context: list[int] | None = None   # every token up to the chunk's last: a model with operand-index embeddings


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor      # (N,)
    positions: torch.Tensor      # (N,)
    slots: torch.Tensor          # (N·H_kv,) where each token's K/V go, per kv head
    B: int
    T: int                       # longest chunk; 1 on a decode-only step
    S: int                       # keys per sequence attended (padded, masked)
    logits_index: torch.Tensor | None   # (M,); None: every row needs logits (a decode step)
    # decode step (T == 1): pool rows read in place
    index: torch.Tensor | None = None      # (B·H·S,) pool row of each (sequence, head, key position)
    pattern: torch.Tensor | None = None    # CSR (B·H, pool rows) with the 0/-inf bias as values
    offsets: torch.Tensor | None = None    # (B·H,) start of each row's S entries in index
    # prefill / mixed step: gathered tiles, padded queries
    tiles: torch.Tensor | None = None      # (2·B·H_kv·nb,) K then V tiles of each sequence's blocks
    pad_index: torch.Tensor | None = None  # (N,) row of each token in the (B·T) padded grid
    bias: torch.Tensor | None = None       # (B·H_kv, g·T, S)
    operand: tuple[torch.Tensor, torch.Tensor] | None = None   # (N,) operand index and part of each token


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, max_seq_len: int | None = None):
        self.model = model
        self.served = served_model(model, max_seq_len)          # ValueError: a model the engine cannot serve
        self.cfg = c = self.served.cfg
        self.H, self.Hkv, self.hd = c.n_head, c.n_kv_head, c.head_dim
        p = self.served.embed
        self.kv = PagedKVCache(c.n_layer, c.n_kv_head, c.head_dim, num_blocks, block_size, p.device, p.dtype)
        self.block_size = block_size
        # In-place decode attention uses sparse CSR kernels tested on CPU; elsewhere the gather path runs
        # (a real deployment would call a fused paged-attention kernel there instead).
        # torch's sparse sampled_addmm has no bf16 kernel: bf16 weights decode through the gather path too
        self.decode_in_place = p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64)
        half = c.head_dim // 2
        # RoPE as one complex multiply: q and k head dims are stored pair-interleaved (x_i, x_{i+hd/2})
        # by permuting the rows of W_q and W_k (scores q·k are unchanged by a permutation applied to
        # both; V is untouched), so rotating is view_as_complex(x) · e^{iθ}. The cached K carries the
        # same permutation. One op instead of mul, flip, mul, add.
        self.perm = torch.stack([torch.arange(half), torch.arange(half) + half], -1).reshape(-1)
        # (L, hd), half-split; fp32 even when gpt_mini's buffers were cast to bf16 with the model
        rope_dtype = torch.promote_types(self.served.rope_cos.dtype, torch.float32)
        cos, sin = self.served.rope_cos.to(rope_dtype), self.served.rope_sin.to(rope_dtype)
        self.cis = torch.complex(cos[:, :half], sin[:, :half]).unsqueeze(1)          # (L, 1, hd/2)
        self.eps = c.norm_eps
        # bf16 / fp16 weights: RoPE, RMSNorm statistics and softmax in fp32, as HF's Llama computes them
        self.rope_fp32 = p.dtype != torch.float32
        self.rms_norm = F.rms_norm if p.dtype == torch.float32 else _rms_norm_fp32
        self._signature = None
        self.refresh()

    # -- weights ------------------------------------------------------------------------------
    def _weights_signature(self) -> tuple:
        params = tuple((p.data_ptr(), p._version) for p in self.served.module.parameters())
        return params + adapter_state(self.served)

    @torch.no_grad()
    def refresh(self) -> bool:
        """Rebuild the fused weights if any parameter changed since the last call; True if it did."""
        sig = self._weights_signature()
        if sig == self._signature:
            return False
        H, Hkv, hd = self.H, self.Hkv, self.hd
        perm = lambda w, n: w.reshape(n, hd, -1)[:, self.perm].reshape(n * hd, *w.shape[1:])   # pair-interleave
        self.w_qkv, self.b_qkv, self.w_gate_up, self.b_gate_up = [], [], [], []
        self.wt_o, self.b_o, self.wt_down, self.b_down = [], [], [], []
        for l in self.served.layers:
            (wq, bq), (wk, bk), (wv, bv) = linear_weight(l.q), linear_weight(l.k), linear_weight(l.v)
            self.w_qkv.append(torch.cat([perm(wq, H), perm(wk, Hkv), wv]))
            self.b_qkv.append(None if bq is None and bk is None and bv is None else torch.cat(
                [perm(_bias(bq, wq), H), perm(_bias(bk, wk), Hkv), _bias(bv, wv)]))         # Qwen2: q/k/v biases
            (wg, bg), (wu, bu) = linear_weight(l.gate), linear_weight(l.up)
            self.w_gate_up.append(torch.cat([wg, wu]))
            self.b_gate_up.append(None if bg is None and bu is None else torch.cat([_bias(bg, wg), _bias(bu, wu)]))
            (wo, bo), (wd, bd) = linear_weight(l.o), linear_weight(l.down)
            self.wt_o.append(wo.t())                                            # views: see in-place updates
            self.wt_down.append(wd.t())
            self.b_o.append(bo)
            self.b_down.append(bd)
        self.w_head, self.b_head = linear_weight(self.served.lm_head)
        self._signature = sig
        return True

    # -- inputs -------------------------------------------------------------------------------
    def prepare(self, chunks: list[Chunk]) -> ForwardBatch:
        """Host-side metadata for one forward, in numpy, then moved to the model's device once."""
        fb = self._prepare(chunks)
        if self.needs_context:
            fb.operand = self._operand(chunks, fb.input_ids.device)
        return fb

    @property
    def needs_context(self) -> bool:
        """Whether chunks must carry `context`: gpt_mini with model.operand_index (rlpt.gpt_mini.model)."""
        return self.served.operand_embed is not None

    @staticmethod
    def _operand(chunks: list[Chunk], dev) -> tuple[torch.Tensor, torch.Tensor]:
        index, resp = [], []
        for c in chunks:
            if c.context is None or len(c.context) != c.start + len(c.tokens):
                raise ValueError("this model has operand-index embeddings: each Chunk needs `context`, every token "
                                 "up to its last")
            i, r = operand_index_list(c.context)
            index += i[c.start:]
            resp += r[c.start:]
        return torch.tensor(index, device=dev), torch.tensor(resp, device=dev)

    def _prepare(self, chunks: list[Chunk]) -> ForwardBatch:
        B, bs, H, Hkv = len(chunks), self.block_size, self.H, self.Hkv
        q_lens = np.fromiter((len(c.tokens) for c in chunks), np.int64, B)
        starts = np.fromiter((c.start for c in chunks), np.int64, B)
        n_logits = np.fromiter((c.n_logits for c in chunks), np.int64, B)
        T, N = int(q_lens.max()), int(q_lens.sum())
        nb = cdiv(int((starts + q_lens).max()), bs)
        ids = np.fromiter(itertools.chain.from_iterable(c.tokens for c in chunks), np.int64, N)
        tables = np.array([c.block_table[:nb] + [0] * (nb - len(c.block_table)) for c in chunks], np.int64)
        ends = np.cumsum(q_lens)
        M = int(n_logits.sum())
        dev = self.cis.device
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)
        tb = t if self.kv.kv[0].dtype == torch.float32 else lambda a: t(a).to(self.kv.kv[0].dtype)   # 0 / -inf masks
        # logits: the last n_logits rows of each chunk; None when every row needs them (a decode step, a prefill
        # of 1-token chunks), which saves building the index and the row gather before the head
        logits_index = None if M == N else t(np.repeat(ends - n_logits, n_logits) + np.arange(M)
                                              - np.repeat(np.cumsum(n_logits) - n_logits, n_logits))
        if T == 1 and self.decode_in_place:                          # decode: sequence b feeds token b
            slots = self.kv.slots(tables[np.arange(B), starts // bs], starts % bs)
            S = int(starts.max()) + 1
            index, bias = self.kv.decode_index(tables, starts + 1, S, H)
            index = t(index)
            pattern = decode_pattern(index, tb(bias), B * H, S, self.kv.num_blocks * Hkv * bs)
            offsets = torch.arange(0, B * H * S, S, device=dev)
            return ForwardBatch(t(ids), t(starts), t(slots), B, 1, S, logits_index,
                                index=index, pattern=pattern, offsets=offsets)
        seq = np.repeat(np.arange(B), q_lens)                                        # (N,)
        local = np.arange(N) - (ends - q_lens)[seq]
        positions = starts[seq] + local
        slots = self.kv.slots(tables[seq, positions // bs], positions % bs)
        q_pos = starts[:, None] + np.arange(T)                                       # (B, T); pad rows harmless
        return ForwardBatch(t(ids), t(positions), t(slots), B, T, nb * bs, logits_index,
                            tiles=t(self.kv.tiles(tables)), pad_index=t(seq * T + local),
                            bias=tb(attention_bias(q_pos, nb * bs, Hkv, H // Hkv)))

    # -- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """-> logits (M, V) for the rows in fb.logits_index.

        Every op is a plain tensor function (no nn.Module calls: their hooks cost ~3 us each), the residual
        adds ride on the projections (addmm: x + o·W_o^T in one BLAS call) and RMSNorm is one
        `F.rms_norm`; at gpt_mini's size each op saved is ~1 % of a decode step."""
        m, H, Hkv, hd, eps = self.served, self.H, self.Hkv, self.hd, self.eps
        g, B, T = H // Hkv, fb.B, fb.T
        N = fb.input_ids.shape[0]
        d = m.cfg.d_model
        cis = self.cis[fb.positions]                                                # (N, 1, hd/2) complex
        x = F.embedding(fb.input_ids, m.embed)                                      # (N, d)
        if fb.operand is not None:
            index, resp = fb.operand
            x = x + F.embedding(index.clamp(max=m.operand_embed.shape[0] - 1), m.operand_embed) + \
                F.embedding(resp, m.segment_embed)
        for i, layer in enumerate(m.layers):
            h = self.rms_norm(x, (d,), layer.input_norm, eps)
            qkv = F.linear(h, self.w_qkv[i], self.b_qkv[i])                         # (N, (H+2H_kv)·hd)
            qk = qkv[:, :(H + Hkv) * hd].float() if self.rope_fp32 else qkv[:, :(H + Hkv) * hd]
            q, k = _rotate(qk[:, :H * hd], N, H, hd, cis), _rotate(qk[:, H * hd:], N, Hkv, hd, cis)
            if self.rope_fp32:                                                      # bf16 / fp16: back after RoPE
                q, k = q.to(qkv.dtype), k.to(qkv.dtype)
            self.kv.write(i, k, qkv[:, (H + Hkv) * hd:], fb.slots)                 # RoPE'd k, v
            if fb.pattern is not None:                                              # decode: in place
                k_rows, v_rows = self.kv.rows(i)
                o = paged_decode_attention(q.view(B * H, hd), k_rows, v_rows, fb.pattern, fb.index, fb.S,
                                           fb.offsets).view(N, H * hd)
            else:                                                                   # prefill: gather tiles
                k, v = self.kv.gather(i, fb.tiles, B)                               # (B·H_kv, S, hd)
                q = q.new_zeros(B * T, H, hd).index_copy_(0, fb.pad_index, q.view(N, H, hd))
                q = q.view(B, T, Hkv, g, hd).permute(0, 2, 3, 1, 4).reshape(B * Hkv, g * T, hd)
                o = paged_attention(q, k, v, fb.bias).view(B, Hkv, g, T, hd)        # (B, H_kv, g, T, hd)
                o = o.permute(0, 3, 1, 2, 4).reshape(B * T, H * hd)[fb.pad_index]
            x = torch.addmm(x if self.b_o[i] is None else x + self.b_o[i], o, self.wt_o[i])   # x + o_proj(o)
            h = self.rms_norm(x, (d,), layer.post_attn_norm, eps)
            gate_up = F.linear(h, self.w_gate_up[i], self.b_gate_up[i])
            gate, up = gate_up.chunk(2, dim=-1)
            x = torch.addmm(x if self.b_down[i] is None else x + self.b_down[i], F.silu(gate) * up,
                            self.wt_down[i])                                        # x + down(silu(gate)·up)
        h = self.rms_norm(x if fb.logits_index is None else x[fb.logits_index], (d,), m.norm, eps)
        return F.linear(h, self.w_head, self.b_head).float()                                    # (M, V)

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        return self.forward(self.prepare(chunks))


def _bias(b: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """A projection's bias, zeros where it has none (so q|k|v biases can be fused when only some exist)."""
    return b if b is not None else w.new_zeros(w.shape[0])


def _rotate(x: torch.Tensor, N: int, n: int, hd: int, cis: torch.Tensor) -> torch.Tensor:
    """Pair-interleaved (N, n·hd) -> rotated (N, n, hd/2, 2) by the complex multiply x · cis (fp32 / fp64)."""
    return torch.view_as_real(torch.view_as_complex(x.view(N, n, hd // 2, 2)) * cis)


def _rms_norm_fp32(x: torch.Tensor, shape, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama's RMSNorm for low-precision x: normalise in fp32, round to x's dtype, then scale."""
    return weight * F.rms_norm(x.float(), shape, None, eps).to(x.dtype)
