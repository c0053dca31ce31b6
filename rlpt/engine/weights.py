"""What the engine serves: a uniform view of a decoder's weights, for gpt_mini and Hugging Face Llama-family models.

    served = served_model(model)        # a gpt_mini GPT, a LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM,
                                        # an rlpt HFPolicy around one, or a peft model wrapping either
    served.cfg.n_head, served.layers[i].q (a module), served.rope_cos / rope_sin (L, hd), served.module (the weights)
    W, b = linear_weight(served.layers[i].q)    # the effective weight and bias (a LoRA delta added, if active)

All four families are the same pre-norm block (lesson 02):

    h = x + o(Attn(RoPE(q(n1(x))), RoPE(k(n1(x))), v(n1(x))));   x' = h + down(silu(gate(n2(h))) · up(n2(h)))
    logits = lm_head(norm(x_L))

and differ only in details the runner handles as data: grouped-query attention (n_kv_head < n_head), q/k/v
biases (Qwen2; `attention_bias` in Llama also biases o), `mlp_bias`, an explicit head_dim, tied or untied
embeddings, rope_theta and a static RoPE scaling (linear, llama3, yarn: the inverse frequencies and YaRN's
attention factor are read from the HF model's own rotary module, so they are HF's numbers), and a sliding
window (Mistral, Qwen2's `use_sliding_window`) that caps the served context at the window, where it is exact.

Why a view and not a conversion (`rlpt.models.hf.hf_to_gpt_mini` copies weights into a gpt_mini): the view
holds *the trainer's own parameters*. An optimizer step or a weight sync changes them in place, the runner's
version-counter check sees it and rebuilds its fused copies, exactly as for gpt_mini: no conversion on each
sync, no second copy of a 7B model, and a LoRA adapter (peft) is merged into the fused weights at that same
rebuild (`linear_weight`), so the base stays untouched and `disable_adapter()` is honoured. gpt_mini stays the
course's minimal model: no bias flags or scaling rules in its code or checkpoint metadata.

Anything the runner cannot compute exactly is a ValueError naming the config field: dynamic / longrope RoPE
(inverse frequencies that change with the sequence length), partial rotary, activations other than silu,
DoRA or LoRA on the embedding, another `model_type`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

HF_FAMILIES = ("llama", "qwen2", "mistral")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")    # inverse frequencies fixed at load time


@dataclass
class ArchConfig:
    """The shape of a served model, in gpt_mini's field names."""
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    d_model: int
    max_seq_len: int
    norm_eps: float
    tie_embeddings: bool


@dataclass
class LayerRefs:
    """One block's weights: the norm weights as tensors, the projections as modules (nn.Linear, or a peft
    LoRA layer whose effective weight `linear_weight` computes)."""
    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module


@dataclass
class ServedModel:
    module: nn.Module                 # the module whose state_dict update_weights writes (the watched parameters)
    cfg: ArchConfig
    embed: torch.Tensor               # (V, d)
    norm: torch.Tensor                # (d,) final RMSNorm weight
    lm_head: nn.Module                # (V, d) Linear
    layers: list[LayerRefs]
    rope_cos: torch.Tensor            # (max_seq_len, head_dim), half-split layout, attention factor included
    rope_sin: torch.Tensor
    tied_names: tuple[str, str] | None    # (embedding, head) names in module.state_dict() when tied
    kind: str                         # "gpt_mini" or the HF model_type
    operand_embed: torch.Tensor | None = None    # gpt_mini's model.operand_index rows (K, d), and its (2, d) part rows
    segment_embed: torch.Tensor | None = None

    def lora_layers(self) -> list[nn.Module]:
        return [m for layer in self.layers for m in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up,
                                                     layer.down) if hasattr(m, "base_layer")] + \
            ([self.lm_head] if hasattr(self.lm_head, "base_layer") else [])


def linear_weight(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of a projection: W = W_base + Σ_active scaling_a · B_a A_a for an unmerged, enabled peft LoRA
    layer (peft's own `get_delta_weight`), else the plain weight. A fresh tensor only when a delta is added."""
    base = getattr(mod, "base_layer", None)
    if base is None:
        return mod.weight, mod.bias
    w = base.weight
    if not getattr(mod, "merged", False) and not getattr(mod, "disable_adapters", False):
        for name in mod.active_adapters:
            if name not in mod.lora_A:
                continue
            if getattr(mod, "use_dora", {}).get(name):
                raise ValueError(f"LoRA adapter {name!r} uses DoRA, which the engine cannot merge; use plain LoRA "
                                 "(use_dora=False) or rollout.backend=simple")
            if getattr(mod, "lora_bias", {}).get(name):
                raise ValueError(f"LoRA adapter {name!r} has lora_bias=True, which the engine does not serve")
            w = w + mod.get_delta_weight(name)
    return w, base.bias


def adapter_state(served: ServedModel) -> tuple:
    """Which LoRA deltas apply now (enabled, merged, active names): part of the runner's weight signature,
    since `with model.disable_adapter():` changes the function without touching any parameter."""
    return tuple((getattr(m, "merged", False), getattr(m, "disable_adapters", False), tuple(m.active_adapters))
                 for m in served.lora_layers())


def _unwrap(model) -> nn.Module:
    """An HFPolicy -> its HF model; a peft model -> the base model (LoRA layers are injected in place)."""
    for _ in range(4):
        if hasattr(model, "get_base_model"):                      # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "new_cache") and isinstance(getattr(model, "model", None), nn.Module) \
                and hasattr(model.model, "config"):               # rlpt.models.hf.HFPolicy
            model = model.model
        else:
            break
    return model


def _is_gpt_mini(model) -> bool:
    return hasattr(model, "cfg") and hasattr(model, "layers") and hasattr(model, "embed")


def served_model(model, max_seq_len: int | None = None) -> ServedModel:
    """The engine's view of `model`; ValueError naming what the engine cannot serve."""
    model = _unwrap(model)
    if _is_gpt_mini(model):
        return _from_gpt_mini(model, max_seq_len)
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"the engine serves gpt_mini GPT models and HF {'/'.join(HF_FAMILIES)} causal LMs; "
                         f"got {type(model).__name__}")
    return _from_hf(model, config, max_seq_len)


def _cap(n: int, max_seq_len: int | None) -> int:
    return n if max_seq_len is None else min(n, max_seq_len)


def _from_gpt_mini(m, max_seq_len) -> ServedModel:
    c = m.cfg
    L = _cap(c.max_seq_len, max_seq_len)
    cfg = ArchConfig(c.vocab_size, c.n_layer, c.n_head, c.n_kv_head, c.head_dim, c.d_model, L, c.norm_eps,
                     c.tie_embeddings)
    if hasattr(m.embed, "base_layer"):
        raise ValueError("LoRA on the embedding is not served by the engine; target the linear layers only")
    layers = [LayerRefs(b.input_norm.weight, b.post_attn_norm.weight, b.attn.q_proj, b.attn.k_proj, b.attn.v_proj,
                        b.attn.o_proj, b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj) for b in m.layers]
    op = (m.operand_embed.weight, m.segment_embed.weight) if c.operand_index else (None, None)
    return ServedModel(m, cfg, m.embed.weight, m.norm.weight, m.lm_head, layers, m.rope_cos[:L], m.rope_sin[:L],
                       ("embed.weight", "lm_head.weight") if c.tie_embeddings else None, "gpt_mini", *op)


def _from_hf(m, config, max_seq_len) -> ServedModel:
    def bad(field, why):
        return ValueError(f"HF config field {field}={getattr(config, field, None)!r}: {why}")
    kind = getattr(config, "model_type", None)
    if kind not in HF_FAMILIES:
        raise bad("model_type", f"the engine serves {', '.join(HF_FAMILIES)} (and gpt_mini); sample this model "
                                "with rollout.backend=simple")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise bad("hidden_act", "the engine's MLP is SwiGLU (silu gate)")
    body = m.model
    if hasattr(body.embed_tokens, "base_layer"):
        raise ValueError("LoRA on embed_tokens is not served by the engine; target the linear layers only")
    H, Hkv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // H
    rot = body.rotary_emb
    rope_type = getattr(rot, "rope_type", "default")
    if rope_type not in STATIC_ROPE:
        raise bad("rope_scaling", f"RoPE scaling type {rope_type!r} is not supported by the engine (its inverse "
                                  f"frequencies change with the sequence length); supported: {', '.join(STATIC_ROPE)}")
    inv_freq = rot.inv_freq.float()                                                  # (hd/2,)
    if inv_freq.numel() * 2 != hd:
        raise bad("partial_rotary_factor", f"rotary dims {inv_freq.numel() * 2} != head_dim {hd}: partial rotary "
                                           "is not supported by the engine")
    L = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    sliding = (kind == "mistral" and window) or "sliding_attention" in (getattr(config, "layer_types", None) or ())
    if sliding and window:
        L = min(L, window)              # inside the window every key is visible: plain causal attention is exact
    L = _cap(L, max_seq_len)
    # cos/sin as HF's rotary module computes them: freqs = pos ⊗ inv_freq, emb = [freqs, freqs], × attention factor
    freqs = torch.outer(torch.arange(L, dtype=torch.float32, device=inv_freq.device), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    scale = float(getattr(rot, "attention_scaling", 1.0))
    tied = bool(getattr(config.get_text_config(decoder=True), "tie_word_embeddings", False)) or \
        m.lm_head.weight is body.embed_tokens.weight
    cfg = ArchConfig(config.vocab_size, config.num_hidden_layers, H, Hkv, hd, config.hidden_size, L,
                     config.rms_norm_eps, tied)
    layers = [LayerRefs(b.input_layernorm.weight, b.post_attention_layernorm.weight, b.self_attn.q_proj,
                        b.self_attn.k_proj, b.self_attn.v_proj, b.self_attn.o_proj, b.mlp.gate_proj, b.mlp.up_proj,
                        b.mlp.down_proj) for b in body.layers]
    return ServedModel(m, cfg, body.embed_tokens.weight, body.norm.weight, m.lm_head, layers,
                       emb.cos() * scale, emb.sin() * scale,
                       ("model.embed_tokens.weight", "lm_head.weight") if tied else None, kind)


def why_not_served(model) -> str | None:
    """None if the engine can serve `model`, else the reason."""
    try:
        served_model(model, max_seq_len=1)      # the checks only: no RoPE tables for a 128k context
    except (ValueError, AttributeError) as e:
        return str(e)
    return None
