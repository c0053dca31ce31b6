"""Model shapes for the perf formulas: a named size (1–700 B, lesson 22's widget), a Hugging Face
`config.json`, or an rlpt run folder (its checkpoint's model metadata, else its config.yaml).

    shape = named("7b");  shape = from_hf_config("ckpt/config.json");  shape = from_run("runs/grpo")
    shape.params  shape.kv_dim (= n_kv_heads · head_dim)  shape.d_model  shape.n_layers

Named sizes interpolate lesson 22's widget table [P (B), d_model, n_layers] linearly in P and take the
widget's head rule (n_heads = max(8, d/128), 8 KV heads), so `named("7b")` is the widget's 7 B exactly; its
`params` is the nominal P, not a count. The three real models of lesson 20's KV table are named too.
Pure python (json, yaml, struct): nothing here imports torch.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from rlpt.config import ConfigError


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int = 0                  # SwiGLU hidden size; 0: unknown (a named size)
    vocab_size: int = 0
    tie_embeddings: bool = False
    n_params: float = 0.0          # nominal P; 0: count it from the shape (Llama block)
    max_seq_len: int = 0

    @property
    def kv_dim(self) -> int:
        """Width of the K (or V) rows per token and layer: n_kv_heads · head_dim (d_model without GQA)."""
        return self.n_kv_heads * self.head_dim

    @property
    def params(self) -> float:
        """P: the nominal count, else a Llama block's exact count (no biases):
        embed V·d (+ lm_head V·d untied) + per layer [d·(H + 2·H_kv)·hd + H·hd·d + 3·d·d_ff + 2d] + final norm d."""
        if self.n_params:
            return self.n_params
        d, hd = self.d_model, self.head_dim
        attn = d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d
        layer = attn + 3 * d * self.d_ff + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return float(emb + self.n_layers * layer + d)


# lesson 22's "Memory envelope" widget: [P in billions, d_model, n_layers]
WIDGET_DIMS = [(1, 2048, 22), (3, 3200, 26), (7, 4096, 32), (13, 5120, 40), (34, 8192, 48), (70, 8192, 80),
               (180, 12288, 96), (405, 16384, 126), (700, 20480, 140)]

# lesson 20's KV table: the real GQA shapes (Llama-3-8B, Llama-3-70B, Qwen-2.5-7B)
REAL = {
    "llama-3-8b": ModelShape("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256, False),
    "llama-3-70b": ModelShape("llama-3-70b", 80, 8192, 64, 8, 128, 28672, 128256, False),
    "qwen2.5-7b": ModelShape("qwen2.5-7b", 28, 3584, 28, 4, 128, 18944, 152064, False),   # (its q/k/v biases uncounted)
}


def named(size: str | float) -> ModelShape:
    """'7b', '70B', 7 or 7e9 -> the widget's shape at that size (1–700 B), or a REAL model by name."""
    if isinstance(size, str) and size.lower() in REAL:
        return REAL[size.lower()]
    try:
        p = float(str(size).lower().removesuffix("b"))
    except ValueError:
        raise ConfigError(f"unknown model size {size!r}: give billions of parameters (1..700, e.g. 7b) or one of "
                          f"{sorted(REAL)}") from None
    if p >= 1e6:          # given as a count, not billions
        p /= 1e9
    lo, hi = WIDGET_DIMS[0][0], WIDGET_DIMS[-1][0]
    if not lo <= p <= hi:
        raise ConfigError(f"model size {p:g} B is outside the course's table ({lo}..{hi} B)")
    for (p0, d0, n0), (p1, d1, n1) in zip(WIDGET_DIMS, WIDGET_DIMS[1:]):
        if p0 <= p <= p1:
            f = (p - p0) / (p1 - p0)
            d, n = round(d0 + f * (d1 - d0)), round(n0 + f * (n1 - n0))
            break
    heads = max(8, d // 128)
    return ModelShape(f"{p:g}b", n, d, heads, 8, d // heads, n_params=p * 1e9)


def from_hf_config(path: str | Path | dict) -> ModelShape:
    """A Hugging Face causal LM's config.json (a file, its folder, or the dict)."""
    if isinstance(path, dict):
        c, name = path, path.get("_name_or_path") or path.get("model_type", "hf")
    else:
        p = Path(path)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise ConfigError(f"no Hugging Face config.json at {path}")
        c, name = json.loads(p.read_text()), p.parent.name
    try:
        d, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        return ModelShape(str(name), int(c["num_hidden_layers"]), d, heads, int(c.get("num_key_value_heads") or heads),
                          int(c.get("head_dim") or d // heads), int(c.get("intermediate_size", 0)),
                          int(c.get("vocab_size", 0)), bool(c.get("tie_word_embeddings", False)),
                          max_seq_len=int(c.get("max_position_embeddings", 0)))
    except KeyError as e:
        raise ConfigError(f"config.json lacks {e.args[0]!r}: is it a decoder-only causal LM's config?") from None


def _safetensors_meta(path: Path) -> dict:
    """The `__metadata__` of a .safetensors file: its header is 8 bytes of little-endian length, then JSON."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {})


def from_gpt_mini(cfg: dict, name: str = "gpt_mini") -> ModelShape:
    """gpt_mini's GPTConfig fields (n_layer, n_head, n_kv_head, d_model, d_ff, vocab_size, ...)."""
    d, h = int(cfg["d_model"]), int(cfg["n_head"])
    return ModelShape(name, int(cfg["n_layer"]), d, h, int(cfg.get("n_kv_head", h)), d // h, int(cfg["d_ff"]),
                      int(cfg.get("vocab_size", 0)), bool(cfg.get("tie_embeddings", True)),
                      max_seq_len=int(cfg.get("max_seq_len", 0)))


def from_run(run_dir: str | Path) -> ModelShape:
    """An rlpt run folder: the model of its latest checkpoint (the metadata every rlpt checkpoint carries, with
    the tokenizer's vocab_size), else config.yaml's `model:` section (vocab_size then unknown: 0)."""
    run_dir = Path(run_dir)
    cks = sorted(run_dir.glob("checkpoints/step_*/model.safetensors"))
    if cks:
        meta = _safetensors_meta(cks[-1])
        if "model" in meta:
            return from_gpt_mini(json.loads(meta["model"]), run_dir.name)
    cfg = run_config(run_dir)
    if "model" not in cfg:
        raise ConfigError(f"{run_dir}/config.yaml has no model section")
    return from_gpt_mini(cfg["model"], run_dir.name)


def run_config(run_dir: str | Path) -> dict:
    """A run folder's config.yaml as a dict (every value the run used)."""
    import yaml
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        raise ConfigError(f"{run_dir} is not an rlpt run folder (no config.yaml)")
    return yaml.safe_load(p.read_text()) or {}


def resolve(spec: str) -> ModelShape:
    """What the CLI's --model takes: a run folder, a config.json (or its folder), a REAL name, or a size."""
    p = Path(spec)
    if (p / "config.yaml").is_file():
        return from_run(p)
    if p.name == "config.json" or (p / "config.json").is_file():
        return from_hf_config(p)
    return named(spec)
