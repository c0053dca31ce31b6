"""gpt_mini: the course's tiny Llama-style decoder.

    h = x + Attn(RMSNorm(x));  out = h + SwiGLU(RMSNorm(h));  logits = W_out RMSNorm(out_L)

RMSNorm (Zhang & Sennrich 2019), rotary positions (Su et al. 2021), SwiGLU (Shazeer 2020),
optional grouped-query attention (Ainslie et al. 2023) and optionally tied input/output
embeddings: the same block as Llama, so `rlpt.models.hf` converts it to `LlamaForCausalLM`
and back with equal logits. No biases, no dropout (dropout would make the trainer's log-probs
differ from the rollout's: lesson 02).

The protocol every rlpt policy obeys is `model(input_ids) -> logits (B, T, V)`. For decoding,
`model(input_ids, cache=cache, positions=pos, key_mask=km)` appends this chunk's keys and values to a
`KVCache` and attends to everything cached so far; its logits equal the full forward's to 1e-5.
For training on packed rows (lesson 22b), `model(input_ids, positions=pos, segment_ids=seg)` runs several
sequences laid end to end in one row: each token attends only to earlier tokens of its own segment (a
block-diagonal causal mask) and its rotary position restarts at 0 with every segment, so each sequence's
logits equal those of its own unpacked forward (to fp32 rounding) and no FLOP goes to padding. With
`branch_ids` too, sequences that start with the same prompt share one copy of it (a shared-prefix tree: the K
samples of a GRPO group, DPO's chosen and rejected): a token sees the prefix (branch 0) and its own branch only.

    python -c "from rlpt.gpt_mini.model import GPT, GPTConfig; print(GPT(GPTConfig()).num_params())"
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rlpt.gpt_mini.attention import sdpa
from rlpt.gpt_mini.operand_index import operand_index, packed_operand_index


@dataclass
class GPTConfig:
    vocab_size: int = 24
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4          # < n_head: grouped-query attention (n_head % n_kv_head == 0)
    d_model: int = 128
    d_ff: int = 352             # SwiGLU hidden size (≈ 8/3 · d_model, rounded)
    max_seq_len: int = 64
    rope_theta: float = 10000.0
    rope: bool = True           # False: no rotary positions at all (NoPE, Kazemnejad et al. 2023)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    operand_index: int = 0      # > 0: operand-index embeddings with this many rows (below); 0: none

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.n_kv_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("head dim (model.d_model / model.n_head) must be even for rotary positions")
        if self.operand_index < 0:
            raise ValueError(f"model.operand_index={self.operand_index} must be >= 0 (0: no operand-index embedding)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_len, head_dim), in the half-split layout HF Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)   # (L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)                                      # (L, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos/sin (B, 1, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Pre-allocated per-layer keys/values (B, H_kv, max_len, hd) plus which slots hold real tokens.

    Rows may be left-padded (prompts of different lengths); `valid` marks the slots a query may attend to.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = 0            # number of slots written so far
        self.operand_state = torch.zeros(batch_size, 3, dtype=torch.long, device=device)   # operand_index's counts
        self.max_len = max_len

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (drop finished sequences from the batch)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        self.valid = self.valid[rows]
        self.operand_state = self.operand_state[rows]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None, mask: torch.Tensor | None):
        if isinstance(mask, tuple):   # varlen: x (N, d) flat tokens, mask = (row_index, token_slot)
            return self._varlen(x, cos, sin, *mask)
        B, T, _ = x.shape
        H, Hkv, hd = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)       # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2)     # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            p = cache.pos
            cache.k[layer][:, :, p:p + T] = k
            cache.v[layer][:, :, p:p + T] = v
            k, v = cache.k[layer][:, :, :p + T], cache.v[layer][:, :, :p + T]
        if Hkv != H:   # GQA: each group of H/Hkv query heads reads one kv head
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        y = sdpa(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))

    def _varlen(self, x, cos, sin, rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Projections and RoPE on the N flat tokens; causal attention in the (R, T) row layout `rows` indexes."""
        N, (R, T) = x.shape[0], rows.shape
        H, Hkv, hd = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q = apply_rope(self.q_proj(x).view(N, H, hd), cos, sin)                    # cos, sin (N, 1, hd)
        k = apply_rope(self.k_proj(x).view(N, Hkv, hd), cos, sin)
        v = self.v_proj(x)
        idx = rows.reshape(-1)
        q, k, v = (t.reshape(N, -1).index_select(0, idx).view(R, T, -1, hd).transpose(1, 2) for t in (q, k, v))
        if Hkv != H:
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        y = sdpa(q, k, v, None)                                                     # (R, H, T, hd), causal
        return self.o_proj(y.transpose(1, 2).reshape(R * T, H * hd).index_select(0, slot))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.input_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layer, cache, mask):
        x = x + self.attn(self.input_norm(x), cos, sin, layer, cache, mask)
        return x + self.mlp(self.post_attn_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.operand_index:   # one row per operand index, and one per part (prompt, response)
            self.operand_embed = nn.Embedding(cfg.operand_index, cfg.d_model)
            self.segment_embed = nn.Embedding(2, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        if not cfg.rope:   # NoPE: the identity rotation (every path, the engine's too, reads these tables)
            cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():   # GPT-2 style scaled init of residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg, batch_size, max_len or self.cfg.max_seq_len, p.device, p.dtype)

    supports_packing = True   # forward takes segment_ids (rlpt.framework.trajectory.pack_rows)
    supports_varlen = True    # forward takes row_index and token_slot (rlpt.framework.varlen)
    grad_checkpointing = False   # trainer.grad_checkpointing: recompute each block's activations in backward

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, branch_ids: torch.Tensor | None = None,
                row_index: torch.Tensor | None = None, token_slot: torch.Tensor | None = None,
                operand_offset: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V).

        Without a cache: a plain causal forward from position 0 (right padding is harmless).
        With a cache: `positions` (B, T) are each token's rotary positions (default: cache.pos + arange)
        and `key_mask` (B, T) marks real tokens (False for left padding) for this chunk.
        Packed (no cache): `segment_ids` (B, T) names the sequence each token belongs to and `positions` (B, T)
        its position within it; query i sees key j iff j <= i and segment_ids[j] == segment_ids[i], and, with
        `branch_ids` (B, T), branch_ids[j] is 0 (a shared prefix) or branch_ids[i].
        Varlen (rlpt.framework.varlen): input_ids and positions (N,) flat tokens, `row_index` (R, T) the flat token
        at each column of each row, `token_slot` (N,) one slot of R·T per token -> logits (N, V).
        `operand_offset` (B, 1): added to every operand index of the row (model.operand_index; SFT's augmentation).
        """
        if row_index is not None:
            return self._forward_varlen(input_ids, positions, row_index, token_slot)
        B, T = input_ids.shape
        if segment_ids is not None:
            return self._forward_packed(input_ids, positions, segment_ids, branch_ids)
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos = self.rope_cos[positions].unsqueeze(1)   # (B, 1, T, hd)
        sin = self.rope_sin[positions].unsqueeze(1)
        mask = None
        if cache is not None:
            cache.valid[:, start:start + T] = True if key_mask is None else key_mask
            q_pos = torch.arange(start, start + T, device=input_ids.device)[:, None]
            k_pos = torch.arange(start + T, device=input_ids.device)[None, :]
            mask = (k_pos <= q_pos) & cache.valid[:, None, :start + T]        # (B, T, S)
            # A left-pad query sees no valid key and would give NaN: let it see itself.
            mask = (mask | (k_pos == q_pos)).unsqueeze(1)                      # (B, 1, T, S)
        x = self.embed(input_ids)
        if self.cfg.operand_index:
            index, resp, state = operand_index(input_ids, state=None if cache is None else cache.operand_state)
            if cache is not None:
                cache.operand_state = state
            x = x + self._operand_embedding(index if operand_offset is None else index + operand_offset, resp)
        for i, layer in enumerate(self.layers):
            x = self._block(layer, x, cos, sin, i, cache, mask)
        if cache is not None:
            cache.pos += T
        return self.lm_head(self.norm(x))

    def _forward_packed(self, input_ids: torch.Tensor, positions: torch.Tensor | None,
                        segment_ids: torch.Tensor, branch_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Block-diagonal causal attention over segments laid end to end; rotary positions restart per segment."""
        B, T = input_ids.shape
        if positions is None or positions.shape != (B, T) or segment_ids.shape != (B, T):
            raise ValueError(f"a packed forward needs positions and segment_ids of the shape of input_ids {(B, T)}")
        if int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"a packed sequence of {int(positions.max()) + 1} tokens exceeds "
                             f"model.max_seq_len={self.cfg.max_seq_len}")
        cos = self.rope_cos[positions].unsqueeze(1)   # (B, 1, T, hd)
        sin = self.rope_sin[positions].unsqueeze(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal                  # (B, T, T)
        if branch_ids is not None:   # the shared prefix, and the query's own branch
            mask &= (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
        mask = mask.unsqueeze(1)                                                                # (B, 1, T, T)
        x = self.embed(input_ids)
        if self.cfg.operand_index:
            x = x + self._operand_embedding(*packed_operand_index(input_ids, segment_ids, branch_ids))
        for i, layer in enumerate(self.layers):
            x = self._block(layer, x, cos, sin, i, None, mask)
        return self.lm_head(self.norm(x))

    def _forward_varlen(self, input_ids, positions, row_index, token_slot) -> torch.Tensor:
        if positions is None or token_slot is None or positions.shape != input_ids.shape:
            raise ValueError("a varlen forward needs positions and token_slot (rlpt.framework.varlen.varlen_rows)")
        if row_index.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"a varlen row of {row_index.shape[1]} tokens exceeds "
                             f"model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)   # (N, 1, hd)
        x = self.embed(input_ids)                                                                   # (N, d)
        if self.cfg.operand_index:   # per row over its columns, then each flat token from its one slot
            index, resp, _ = operand_index(input_ids[row_index])
            x = x + self._operand_embedding(index.reshape(-1)[token_slot], resp.reshape(-1)[token_slot])
        for i, layer in enumerate(self.layers):
            x = self._block(layer, x, cos, sin, i, None, (row_index, token_slot))
        return self.lm_head(self.norm(x))

    def _operand_embedding(self, index: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
        """Indices past the table's last row share it (a prompt of more operands than rows)."""
        return self.operand_embed(index.clamp(max=self.cfg.operand_index - 1)) + self.segment_embed(resp.long())

    def _block(self, layer: Block, x, cos, sin, i, cache, mask) -> torch.Tensor:
        """One block. With `grad_checkpointing` (training, grad on) only its input is kept for backward and its
        activations are recomputed there: the blocks' saved activations shrink to n_layer · B·T·d (their inputs) plus
        one block's, for one more forward of each block. use_reentrant=False: the gradients are the plain path's."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
            return checkpoint(layer, x, cos, sin, i, cache, mask, use_reentrant=False)
        return layer(x, cos, sin, i, cache, mask)


# -- building and loading (floor 0's config and checkpoints; the model's own shape checks) ----------
def make_model(cfg, tok) -> GPT:
    """A freshly initialised gpt_mini of `cfg` (rlpt.config.ModelConfig); vocab_size from the tokenizer."""
    return GPT(GPTConfig(vocab_size=tok.vocab_size, **cfg.model_dump()))


def load_model(path, expect=None, tok=None) -> GPT:
    """Build gpt_mini from a checkpoint's stored config (a checkpoint or run folder) and load its weights.

    With `expect` (a ModelConfig), a config whose shape differs from the checkpoint's is an error naming the keys.
    """
    from rlpt.checkpoint import CheckpointError, load_weights, read_checkpoint_meta, resolve_checkpoint
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    path = resolve_checkpoint(path)
    meta = read_checkpoint_meta(path)
    if meta.get("kind") is not None:   # e.g. an `rlpt rm` checkpoint: a trunk with a scalar head, not a policy
        raise CheckpointError(f"checkpoint {str(path)!r} is a {meta['kind']} checkpoint, not a policy: start from "
                              "an SFT or RL run folder (rlpt sft / train / dpo), e.g. init_from=runs/sft")
    if expect is not None:
        want = GPTConfig(vocab_size=(tok or CharTokenizer()).vocab_size, **expect.model_dump()).to_dict()
        old = GPTConfig().to_dict()   # a key older checkpoints do not record holds its default
        diff = [f"model.{k}: checkpoint {meta.get(k, old[k])!r} vs config {v!r}" for k, v in want.items()
                if meta.get(k, old[k]) != v]
        if diff:
            raise CheckpointError(f"checkpoint {str(path)!r} was trained with a different model than the config "
                                  f"describes ({'; '.join(diff)}). Set those keys to the checkpoint's values "
                                  "or start from a matching checkpoint.")
    try:
        model = GPT(GPTConfig(**meta))
    except TypeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} stores an unknown model config: {e}") from None
    load_weights(path, model)
    return model
