"""`rlpt train model.hf_path=<dir> [lora.r=8]`: a Hugging Face policy in place of gpt_mini (docs/real_models.md §5).

    TrainModelConfig   gpt_mini's shape, or `hf_path`: a local Llama / Qwen2 / Mistral directory (e.g. `rlpt export`)
    LoraSection        lora.r (0 = full fine-tuning), lora.alpha, lora.targets, lora.sync (adapters | merged)
    load_policy        the policy `build` wires: gpt_mini from a checkpoint, or the HF model (+ LoRA adapters)
    checkpointed       what a checkpoint's model.safetensors holds: the weights, or under LoRA the adapters only
    rollout_policy     the rollout's copy: a deep copy, or under LoRA one sharing the frozen base (lora.sync)
    sync_payload       what a weight sync moves: every parameter, or under LoRA the adapters / merged weights
    set_grad_checkpointing   trainer.grad_checkpointing on gpt_mini or an HF policy
    DataSection        data.prompts (a prompt set for env.name=math), data.format, data.heldout, data.chat_template
    env_tokenizer      the env's and the rollout's tokenizer: CharTokenizer, or the HF model's own (+ chat template)
    prompt_set_kwargs  the math env's training and held-out rows, each prompt checked to fit the model's context

The arithmetic envs score CharTokenizer ids, so on them the HF tokenizer must be gpt_mini's (`check_char_tokenizer`);
env.name=math scores text, so it runs any HF model with its own tokenizer (`ANY_TOKENIZER_ENVS`).
rlpt.train re-exports these names; its TrainJob holds the sections.
"""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from rlpt.config import ConfigError, ModelConfig, Section
from rlpt.gpt_mini.model import load_model
from rlpt.gpt_mini.tokenizer import ALPHABET, CharTokenizer


class TrainModelConfig(ModelConfig):
    """gpt_mini's shape, or a Hugging Face policy (`hf_path`; the shape keys are then unused)."""
    hf_path: str | None = Field(None, description="a local Hugging Face causal-LM directory as the policy, e.g. "
                                "`rlpt export` output (on the arithmetic envs its tokenizer must be gpt_mini's; "
                                "env.name=math takes its own); None = gpt_mini")

    def gpt_mini(self) -> ModelConfig:
        """The gpt_mini shape alone (what load_model and SFT take)."""
        return ModelConfig(**self.model_dump(exclude={"hf_path"}))

    def __eq__(self, other) -> bool:
        # the pipeline hands its RL stage a ModelConfig: without hf_path this is that same gpt_mini
        if type(other) is ModelConfig:
            return self.hf_path is None and self.gpt_mini() == other
        return super().__eq__(other)


class LoraSection(Section):
    """LoRA on a Hugging Face policy (rlpt.models.lora): W' = W + (alpha / r)·B A, only A and B trained."""
    r: int = Field(0, ge=0, description="adapter rank; 0 = off (full fine-tuning); needs model.hf_path")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / r")
    targets: str | list[str] = Field("all-linear", description="'all-linear' or module names, e.g. [q_proj, v_proj]")
    sync: Literal["adapters", "merged"] = Field(
        "adapters", description="what a weight sync moves to the rollout: 'adapters' (A, B only; the rollout "
        "copy shares the frozen base) or 'merged' (W + alpha/r·BA for every weight, into a plain second copy)")


class DataSection(Section):
    """A prompt set of your own for env.name=math, and how its prompts reach the policy (docs/real_models.md)."""
    prompts: str | None = Field(None, description="the prompt set: a .jsonl or .parquet file, hf:owner/name or a "
                                "`save_to_disk` directory; None = the env's built-in task (env.name=math only)")
    format: Literal["rows", "gsm8k", "math"] = Field(
        "rows", description="rows: {prompt, answer, id, source, metadata, system}; gsm8k: {question, answer: "
                            "'... #### 72'}; "
                            "math: {problem, solution with \\boxed{}, level, type} (rlpt/data/formats.py)")
    heldout: str | float = Field(0.1, description="the held-out rows: a file in data.format, or the fraction of "
                                 "data.prompts held out (0 < f < 1, a fixed draw; those rows are never trained on)")
    chat_template: bool = Field(False, description="encode each prompt as a user message through the tokenizer's "
                                "chat template with the generation prompt (needs model.hf_path); false = plain text")
    system: str | None = Field(None, description="a system message before each prompt (needs data.chat_template)")

    def check(self, env_name: str, hf_path: str | None) -> None:
        """The section's keys against the env and the model; a ValueError naming the key."""
        if isinstance(self.heldout, float) and not 0 < self.heldout < 1:
            raise ValueError(f"data.heldout={self.heldout} is a fraction of data.prompts: give 0 < f < 1, or a file")
        if self.prompts is None:
            changed = [k for k in ("format", "heldout") if getattr(self, k) != DataSection.model_fields[k].default]
            if changed:
                raise ValueError(f"data.{changed[0]} is set but data.prompts is not: set data.prompts=<file>")
        elif env_name not in ANY_TOKENIZER_ENVS:
            raise ValueError(f"data.prompts is a prompt set for env.name=math, but env.name={env_name} draws its own "
                             "prompts: set env.name=math (or math_reward_model), or remove data.prompts")
        if (self.chat_template or self.system is not None) and hf_path is None:
            raise ValueError("data.chat_template / data.system need model.hf_path: gpt_mini has no chat template")
        if self.chat_template and env_name not in ANY_TOKENIZER_ENVS:
            raise ValueError(f"data.chat_template=true with env.name={env_name}: its prompts are gpt_mini's "
                             "character ids; set env.name=math, or data.chat_template=false")
        if self.system is not None and not self.chat_template:
            raise ValueError("data.system is a system message for the chat template: set data.chat_template=true")


HF_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")   # what the engine serves
# envs that score decoded text: they run an HF model with its own tokenizer, on data.prompts
ANY_TOKENIZER_ENVS = ("math", "math_reward_model")


def check_hf_path(path: str) -> dict:
    """model.hf_path must be a local HF directory of a causal LM the engine serves -> its config.json."""
    d = Path(path)
    if not d.is_dir():
        raise ValueError(f"model.hf_path={path!r} is not a directory (a local `save_pretrained` folder, e.g. the "
                         "output of `rlpt export runs/x out_dir/`; hub ids are not fetched)")
    if not (d / "config.json").is_file():
        raise ValueError(f"model.hf_path={path!r} has no config.json: not a Hugging Face model directory")
    config = json.loads((d / "config.json").read_text())
    archs = config.get("architectures") or []
    if not any(a in HF_ARCHITECTURES for a in archs):
        raise ValueError(f"model.hf_path={path!r} holds {archs or config.get('model_type')!r}, not a causal LM "
                         f"`rlpt train` runs: one of {', '.join(HF_ARCHITECTURES)}")
    return config


def check_char_tokenizer(tokenizer, path: str, env_name: str = "arithmetic") -> None:
    """The arithmetic envs speak CharTokenizer ids: the HF tokenizer must give the same ids for the alphabet."""
    tok = CharTokenizer()
    text = ALPHABET[1:]     # every character but NUL (the pad)
    if tokenizer is None or tokenizer.encode(text) != tok.encode(text) or tokenizer.eos_id != tok.eos_id:
        raise ValueError(f"model.hf_path={path!r}: its tokenizer is not gpt_mini's character tokenizer (other ids "
                         f"for the alphabet or another EOS), and env.name={env_name} scores CharTokenizer ids. Use a "
                         "directory written by `rlpt export` (it has rlpt_export.json), or env.name=math with "
                         "data.prompts=<file> (any tokenizer; docs/real_models.md, \"Your own model and data\")")


def load_policy(job, init: Path, tok: CharTokenizer):
    """gpt_mini from checkpoint `init`, or the HF policy of model.hf_path (+ LoRA when lora.r > 0)."""
    if not job.model.hf_path:
        return load_model(init, job.model.gpt_mini(), tok)
    from rlpt.models.hf import load_hf_policy
    policy = load_hf_policy(job.model.hf_path)
    if job.env.name not in ANY_TOKENIZER_ENVS:
        check_char_tokenizer(policy.tokenizer, job.model.hf_path, job.env.name)
    if job.lora.r:
        from rlpt.models.lora import LoraSpec, apply_lora
        policy = apply_lora(policy, LoraSpec(r=job.lora.r, alpha=job.lora.alpha, targets=job.lora.targets))
    return policy


def env_tokenizer(job, policy, tok: CharTokenizer):
    """The env's and the rollout's tokenizer: `tok` (gpt_mini, or an HF policy on an arithmetic env, whose
    tokenizer check_char_tokenizer found equal), else the HF model's own, prompts through its chat template when
    data.chat_template (rlpt/models/chat.py)."""
    if not job.model.hf_path or job.env.name not in ANY_TOKENIZER_ENVS:
        return tok
    from rlpt.models.chat import PromptTokenizer
    return PromptTokenizer(policy.tokenizer, chat_template=job.data.chat_template, system=job.data.system)


def prompt_set_kwargs(job, tok=None, max_len: int | None = None) -> dict:
    """The math env's `rows` and `heldout_rows` from data.prompts (none without it). With `tok` and `max_len`,
    every prompt is encoded once and must leave rollout.max_tokens of room in the model's context."""
    return prompt_set_rows(job.data, job.rollout.max_tokens, tok, max_len)


def prompt_set_rows(d: DataSection, max_tokens: int, tok=None, max_len: int | None = None) -> dict:
    """prompt_set_kwargs for a data section and the response length `max_tokens` it must leave room for."""
    if d.prompts is None:
        return {}
    from rlpt.data.formats import read_prompt_set
    rows = read_prompt_set(d.prompts, d.format)
    if isinstance(d.heldout, str):
        train, held = rows, read_prompt_set(d.heldout, d.format)
    else:
        n_held = max(1, round(d.heldout * len(rows)))
        if n_held >= len(rows):
            raise ConfigError(f"data.prompts={d.prompts!r} has {len(rows)} rows: data.heldout={d.heldout} leaves "
                              "none to train on; give more rows, a smaller fraction, or a held-out file")
        picked = set(random.Random(0).sample(range(len(rows)), n_held))   # the same rows for every run
        train = [r for i, r in enumerate(rows) if i not in picked]
        held = [r for i, r in enumerate(rows) if i in picked]
    own = next((r for r in train + held if r.system is not None), None)
    if own is not None and not d.chat_template:
        raise ConfigError(f"data.prompts: row {own.id!r} has its own system message, which only the chat template "
                          "can carry: set data.chat_template=true (with model.hf_path), or drop the rows' system")
    if tok is not None and max_len is not None:
        encode = getattr(tok, "encode_prompt", tok.encode)
        room = max_len - max_tokens
        for r in train + held:
            try:
                n = len(encode(r.prompt) if r.system is None else encode(r.prompt, r.system))
            except ValueError as e:   # CharTokenizer: a character outside gpt_mini's alphabet
                raise ConfigError(f"data.prompts: row {r.id!r} cannot be encoded ({e}): gpt_mini writes only its "
                                  "arithmetic alphabet; use model.hf_path=<a model with its own tokenizer>") from None
            if n > room:
                raise ConfigError(f"data.prompts: row {r.id!r} ({r.source}) is {n} tokens, and with "
                                  f"rollout.max_tokens={max_tokens} it overflows the model's context of "
                                  f"{max_len}: lower rollout.max_tokens, or drop the longer rows")
    return {"rows": train, "heldout_rows": held}


def rollout_policy(job, policy) -> torch.nn.Module:
    """The rollout's own copy of the policy: a deep copy, or under LoRA `rollout_copy(policy, lora.sync)`
    (adapters: the frozen base shared, only A, B copied; merged: a plain HF model)."""
    if not job.lora.r:
        return copy.deepcopy(policy)
    if job.lora.sync == "merged" and getattr(job.sync, "lag", 0):
        raise ValueError(f"sync.lag={job.sync.lag} with lora.sync=merged: the lagged syncer copies parameters by the "
                         "trainer's names, which a merged rollout copy does not have; use lora.sync=adapters")
    from rlpt.models.lora import rollout_copy
    return rollout_copy(policy, job.lora.sync)


def sync_payload(job):
    """What WeightSyncer moves (its `payload`): None = every parameter; under LoRA the adapters or the merged
    weights (rlpt.models.lora.adapter_payload / merged_payload)."""
    if not job.lora.r:
        return None
    from rlpt.models.lora import adapter_payload, merged_payload
    return adapter_payload if job.lora.sync == "adapters" else merged_payload


def set_grad_checkpointing(policy, on: bool = True) -> None:
    """trainer.grad_checkpointing on gpt_mini (torch.utils.checkpoint per block) or an HF policy (its own
    gradient_checkpointing_enable): each block's activations are recomputed in backward instead of kept."""
    if hasattr(policy, "set_grad_checkpointing"):
        policy.set_grad_checkpointing(on)
    elif hasattr(type(policy), "grad_checkpointing"):
        policy.grad_checkpointing = on
    else:
        raise ValueError(f"trainer.grad_checkpointing: {type(policy).__name__} is neither gpt_mini nor an HF policy")


def checkpointed(job, model: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    """What a checkpoint's model.safetensors holds, and its metadata: gpt_mini's weights and shape, an HF policy's
    full state dict, or under LoRA the adapters only (the base is model.hf_path, unchanged)."""
    if not job.model.hf_path:
        return model, model.cfg.to_dict()
    meta = {"hf_path": job.model.hf_path, "lora": job.lora.model_dump()}
    if not job.lora.r:
        return model, meta
    from rlpt.models.lora import AdapterWeights
    return AdapterWeights(model), meta


# -- a multi-stage recipe on a Hugging Face policy (rlpt.recipe) ------------------------------------------------
def check_char_stage_tokenizer(tokenizer, hf_dir: str | Path, kind: str) -> None:
    """A recipe's sft / rm / dpo / rs_sft stage on an HF policy trains on the arithmetic task's character ids."""
    try:
        check_char_tokenizer(tokenizer, str(hf_dir))
    except ValueError:
        raise ValueError(f"model.hf_path={str(hf_dir)!r}: its tokenizer is not gpt_mini's character tokenizer, and a "
                         f"recipe's {kind} stage trains on the arithmetic task in those ids (its demonstrations, "
                         "pairs and samples). Use a directory written by `rlpt export`, or a recipe of train stages "
                         "only (env.name=math with data.prompts=<file> takes any tokenizer)") from None


def hf_tokenizer(hf_dir: str | Path):
    """The tokenizer of an HF directory alone (rlpt's interface), without loading the weights."""
    from transformers import AutoTokenizer

    from rlpt.models.hf import HFTokenizerAdapter
    try:
        return HFTokenizerAdapter(AutoTokenizer.from_pretrained(hf_dir, local_files_only=True))
    except (OSError, ValueError) as e:
        raise ValueError(f"model.hf_path={str(hf_dir)!r}: its tokenizer does not load ({e})") from None


def load_char_policy(hf_dir: str | Path, kind: str = "sft"):
    """The HF policy of `hf_dir` for a recipe stage of kind sft, rm, dpo or rs_sft (check_char_stage_tokenizer)."""
    from rlpt.models.hf import load_hf_policy
    policy = load_hf_policy(hf_dir)
    check_char_stage_tokenizer(policy.tokenizer, hf_dir, kind)
    return policy


def hf_meta(hf_dir: str | Path) -> dict:
    """A checkpoint's metadata for a fully fine-tuned HF policy that started from `hf_dir` (as `checkpointed`)."""
    return {"hf_path": str(hf_dir), "lora": LoraSection().model_dump()}


def save_stage_policy(job, start: str | Path, ckpt: Path, out: Path) -> Path:
    """A stage's final weights as a `save_pretrained` directory `out` (the next stage's model.hf_path, and what a
    user takes back to the HF ecosystem): the policy of `start` with checkpoint `ckpt` loaded, under LoRA merged
    (W + α/r·BA, rlpt.models.lora.rollout_copy), plus the tokenizer. Written beside and renamed into place, so
    `out` is whole or absent."""
    import shutil

    from rlpt.checkpoint import load_weights
    from rlpt.models.hf import load_hf_policy, quiet_progress
    policy = load_hf_policy(start)
    lora = getattr(job, "lora", None)
    if lora is not None and lora.r:
        from rlpt.models.lora import LoraSpec, apply_lora, rollout_copy
        policy = apply_lora(policy, LoraSpec(r=lora.r, alpha=lora.alpha, targets=lora.targets))
        load_weights(ckpt, checkpointed(job, policy)[0])
        policy = rollout_copy(policy, "merged")
    else:
        load_weights(ckpt, policy)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_progress():
        policy.model.save_pretrained(tmp)
        policy.tokenizer.tok.save_pretrained(tmp)
    (tmp / "rlpt_stage.json").write_text(json.dumps({"start": str(start), "checkpoint": str(ckpt)}, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
