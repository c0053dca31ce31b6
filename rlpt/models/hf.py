"""Hugging Face bridge: gpt_mini <-> `LlamaForCausalLM`, and any HF causal LM as an rlpt policy.

    hf = gpt_mini_to_hf(gpt)                 # LlamaForCausalLM with equal logits (fp32, 1e-5)
    gpt = hf_to_gpt_mini(hf)                 # back again; ValueError names any field gpt_mini lacks
    policy = load_hf_policy("ckpts/my-llama")    # local dir only, never the hub
    samples = generate(policy, [policy.tokenizer.encode("3+4=")], SamplingParams(),
                       policy.tokenizer.eos_id, policy.tokenizer.pad_id)

The rollout engine serves a Llama / Qwen2 / Mistral `HFPolicy` (or the bare model, or a LoRA-wrapped one) in
place, reading the trainer's own parameters (rlpt/engine/weights.py), so `hf_to_gpt_mini` is for when you
want a gpt_mini; `rlpt export` (rlpt/models/export.py) writes gpt_mini as a HF directory, LoRA is
rlpt/models/lora.py.

`HFPolicy` obeys gpt_mini's protocol: `policy(input_ids) -> logits (B, T, V)` as a plain tensor, and
`policy(ids, cache=policy.new_cache(B), positions=pos, key_mask=km)` for incremental decoding, so
`rlpt.gpt_mini.generate.generate` and the trainers use it unchanged. Dropout in the wrapped model
(e.g. `attention_dropout`) is live in train mode and would make trainer log-probs differ from the
rollout's: keep it at 0 for RL.

Needs the optional dependency: `pip install rlpt[hf]`.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM

from rlpt.gpt_mini.generate import stop_set
from rlpt.gpt_mini.model import GPT, GPTConfig

# gpt_mini block name -> Llama block name; embedding, final norm and lm_head are mapped separately.
_LAYER_NAMES = {
    "input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm", "attn": "self_attn",
}


def _to_hf_name(name: str) -> str:
    if name == "lm_head.weight":
        return name
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    parts = name.split(".")
    if parts[0] == "layers":     # layers.{i}.{module}.{...}
        parts[2] = _LAYER_NAMES.get(parts[2], parts[2])
    return "model." + ".".join(parts)


def check_llama_form(c) -> None:
    """A ValueError naming the key when gpt_mini config `c` has no Llama equivalent (NoPE, operand-index rows)."""
    if not c.rope:
        raise ValueError("this gpt_mini has no rotary positions (model.rope=false), which a Llama always applies: it "
                         "cannot be exported to Hugging Face or served by vLLM; train with model.rope=true to export")
    if c.operand_index:
        raise ValueError(f"this gpt_mini has operand-index embeddings (model.operand_index={c.operand_index}), which a "
                         "Llama has no place for: it cannot be exported to Hugging Face or served by vLLM; train "
                         "with model.operand_index=0 to export")


def gpt_mini_to_hf(model: GPT, attn_implementation: str = "sdpa", **config_kwargs) -> LlamaForCausalLM:
    """An equivalent `LlamaForCausalLM` (same device and dtype). `config_kwargs` go to `LlamaConfig`
    (e.g. `eos_token_id=...`); the architecture fields are fixed by `model.cfg`."""
    c = model.cfg
    check_llama_form(c)
    config = LlamaConfig(**{
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **config_kwargs,
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "attn_implementation": attn_implementation,
    })
    p = model.embed.weight
    hf = LlamaForCausalLM(config).to(device=p.device, dtype=p.dtype)
    hf.load_state_dict({_to_hf_name(k): v for k, v in model.state_dict().items()}, strict=True)
    return hf.eval()


def _rope_theta(config) -> float:
    """rope_theta, after checking the rotary embedding is plain RoPE (no scaling of any kind)."""
    # transformers 5 keeps theta inside `rope_parameters` (`rope_scaling` is an alias); 4.x has both apart.
    for field in ("rope_parameters", "rope_scaling"):
        rp = getattr(config, field, None) or {}
        kind = rp.get("rope_type", rp.get("type", "default"))
        extra = set(rp) - {"rope_type", "type", "rope_theta"}
        if kind != "default" or extra:
            raise ValueError(f"HF config field {field}={rp!r} (rope_scaling: RoPE scaling or partial rotary) "
                             "cannot be represented by gpt_mini, which implements plain RoPE only")
        if "rope_theta" in rp:
            return float(rp["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def gpt_config_from_hf(config) -> GPTConfig:
    """The GPTConfig of a Llama config; ValueError naming the first field gpt_mini cannot represent."""
    def bad(field, why):
        return ValueError(f"HF config field {field}={getattr(config, field, None)!r} cannot be represented "
                          f"by gpt_mini: {why}")
    if getattr(config, "model_type", None) != "llama":
        raise bad("model_type", "only 'llama' checkpoints share gpt_mini's architecture")
    if getattr(config, "attention_bias", False):
        raise bad("attention_bias", "gpt_mini's attention projections have no bias")
    if getattr(config, "mlp_bias", False):
        raise bad("mlp_bias", "gpt_mini's MLP has no bias")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise bad("hidden_act", "gpt_mini's MLP is SwiGLU (silu gate)")
    if getattr(config, "attention_dropout", 0.0):
        raise bad("attention_dropout", "gpt_mini has no dropout")
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    if head_dim * n_head != config.hidden_size:
        raise bad("head_dim", f"gpt_mini needs head_dim == hidden_size / num_attention_heads "
                              f"= {config.hidden_size} / {n_head}")
    theta = _rope_theta(config)
    try:
        return GPTConfig(
            vocab_size=config.vocab_size, n_layer=config.num_hidden_layers, n_head=n_head,
            n_kv_head=getattr(config, "num_key_value_heads", None) or n_head, d_model=config.hidden_size,
            d_ff=config.intermediate_size, max_seq_len=config.max_position_embeddings, rope_theta=theta,
            norm_eps=config.rms_norm_eps, tie_embeddings=bool(config.tie_word_embeddings))
    except ValueError as e:
        raise ValueError(f"HF config cannot be represented by gpt_mini: {e}") from None


def hf_to_gpt_mini(hf_model) -> GPT:
    """An equivalent gpt_mini `GPT` of a `LlamaForCausalLM` (same device and dtype)."""
    gpt_cfg = gpt_config_from_hf(hf_model.config)
    hf_sd = hf_model.state_dict()
    p = hf_sd["model.embed_tokens.weight"]
    gpt = GPT(gpt_cfg).to(device=p.device, dtype=p.dtype)
    # A tied checkpoint may list only the embedding; the lm_head then is that same matrix.
    sd = {k: hf_sd.get(_to_hf_name(k), p if k == "lm_head.weight" and gpt_cfg.tie_embeddings else None)
          for k in gpt.state_dict()}
    missing = [_to_hf_name(k) for k, v in sd.items() if v is None]
    if missing:
        raise ValueError(f"HF state dict lacks {missing[:4]} (is this a LlamaForCausalLM?)")
    gpt.load_state_dict(sd, strict=True)
    return gpt.eval()


@dataclass
class HFPolicyConfig:
    max_seq_len: int
    vocab_size: int


class HFCache:
    """A transformers `DynamicCache` plus the 2D key mask (B, S) of every slot written so far.

    HF takes the mask of all keys (past and current) on every call, so the per-chunk `key_mask`s
    that gpt_mini's interface passes are accumulated here.
    """

    def __init__(self, kv: DynamicCache, batch_size: int, max_len: int, device):
        self.kv = kv
        self.mask = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)   # (B, pos)
        self.pos = 0
        self.max_len = max_len

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (drop finished sequences from the batch)."""
        self.kv.batch_select_indices(rows)
        self.mask = self.mask[rows]


class HFPolicy(nn.Module):
    """Any `AutoModelForCausalLM` behind gpt_mini's policy interface. `tokenizer` (HF or adapter) is optional."""

    def __init__(self, model, tokenizer=None):
        super().__init__()
        self.model = model
        c = model.config.get_text_config(decoder=True)
        self.cfg = HFPolicyConfig(max_seq_len=c.max_position_embeddings, vocab_size=c.vocab_size)
        if tokenizer is not None and not isinstance(tokenizer, HFTokenizerAdapter):
            tokenizer = HFTokenizerAdapter(tokenizer)
        self.tokenizer = tokenizer
        # transformers 5 renamed `past_key_values` to `cache` (the old name is deprecated); 4.x only has the old.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def set_grad_checkpointing(self, on: bool = True) -> None:
        """trainer.grad_checkpointing: the HF model's own per-layer checkpointing, active in train mode with grad on.
        use_reentrant=False: the gradients are the plain path's, and a frozen base under LoRA needs no input that
        requires grad (the reentrant variant would drop the adapters' gradients without one)."""
        hf = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model   # peft: inside
        kwargs = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):     # transformers >= 5.2x; the old names warn there
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs) if on \
                else hf.activation_checkpointing_disable()
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs) if on \
                else hf.gradient_checkpointing_disable()

    @property
    def grad_checkpointing(self) -> bool:
        hf = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return any(getattr(m, "gradient_checkpointing", False) for m in hf.modules())

    def new_cache(self, batch_size: int, max_len: int | None = None) -> HFCache:
        device = next(self.model.parameters()).device
        return HFCache(DynamicCache(config=self.model.config), batch_size, max_len or self.cfg.max_seq_len, device)

    def forward(self, input_ids: torch.Tensor, cache: HFCache | None = None,
                positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V); the cache semantics are gpt_mini's (see GPT.forward)."""
        if cache is None:
            return self.model(input_ids=input_ids, use_cache=False).logits
        B, T = input_ids.shape
        start = cache.pos
        if start + T > min(cache.max_len, self.cfg.max_seq_len):
            raise ValueError(f"sequence of {start + T} tokens exceeds the cache's max_len={cache.max_len} "
                             f"or max_position_embeddings={self.cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        if key_mask is None:
            key_mask = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        cache.mask = torch.cat([cache.mask, key_mask.to(torch.bool)], dim=1)    # (B, start + T)
        # A left-pad query sees no key at all; HF's eager mask (dtype min, not -inf) and torch's SDPA
        # both keep its output finite, so no NaN leaks into the real rows' keys and values.
        out = self.model(input_ids=input_ids, attention_mask=cache.mask, position_ids=positions,
                         use_cache=True, **{self._cache_kwarg: cache.kv})
        cache.pos += T
        return out.logits


class HFTokenizerAdapter:
    """A HF tokenizer with rlpt's tokenizer interface. Like CharTokenizer, decode() drops pads but keeps EOS."""

    def __init__(self, tokenizer, add_special_tokens: bool = False, stop_ids=None):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token; "
                             "rlpt needs one to stop generation")
        self.tok = tokenizer
        self.add_special_tokens = add_special_tokens     # e.g. True to prepend Llama's BOS
        self.eos_id = int(tokenizer.eos_token_id)
        # every id that ends a response: EOS first, then what the model's generation_config.json adds (a chat model's
        # end-of-turn token, e.g. Llama 3's <|eot_id|> beside <|end_of_text|>); rlpt.gpt_mini.generate.stop_ids
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *(int(i) for i in stop_ids or ())]))
        # Many causal LMs ship without a pad token; pads are masked out anyway, so EOS serves.
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=self.add_special_tokens))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.pad_id != self.eos_id:
            ids = [i for i in ids if i != self.pad_id]
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' own progress bars (loading and writing weights shards) off inside the block: a recipe loads
    and saves a model at every stage, and one bar a load is noise there."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_hf_policy(path_or_dir: str | Path, dtype: torch.dtype = torch.float32, device=None,
                   attn_implementation: str | None = None) -> HFPolicy:
    """A policy (with `.tokenizer`) from a local `save_pretrained` directory; never touches the network."""
    path = Path(path_or_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"HF model directory {str(path)!r} does not exist (only local directories "
                                "are loaded, never the hub)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a HF model directory: it has no config.json "
                         "(write one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))")
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        with quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a HF causal LM and tokenizer from {str(path)!r}: {e}") from e
    if device is not None:
        model = model.to(device)
    return HFPolicy(model.eval(), HFTokenizerAdapter(tokenizer, stop_ids=generation_stop_ids(model)))


def generation_stop_ids(model) -> list[int]:
    """The EOS ids a model's generation_config.json lists (an int or a list there; none without one)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else list(stop_set(eos))
