"""Typed configs: pydantic models loaded from YAML, with `a.b=value` overrides from the command line.

    job = load_config(SFTJob, "recipes/sft_arith.yaml", ["sft.steps=200", "model.n_layer=2"])   # rlpt.sft.SFTJob

Every section forbids unknown keys, so a typo is an error that names the key and the closest
valid one; a wrong type or an out-of-range value names the key and what was given. Values in
overrides are parsed as YAML scalars (`3` is an int, `true` a bool, `[1, 2]` a list).

A ConfigError is one line, whatever the input: a recipe must be UTF-8 and may not repeat a key (PyYAML
keeps the last one silently), every number must be finite (`lr=.inf` would train NaN weights) and fit in
64 bits (torch seeds and sizes are int64), no string may hold a NUL byte (the OS rejects it in a path), and
any value an error quotes is cut to `QUOTE_CHARS` (a 600-byte YAML alias bomb expands to megabytes).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlpt.validate import (  # noqa: F401 - re-exported: the names every job imports from rlpt.config
    QUOTE_CHARS,
    ConfigError,
    DuplicateKeyError,
    UniqueKeyLoader,
    one_line,
    quote,
    read_text,
    read_yaml,
    unrepresentable,
)


def split_recipe_args(items: list[str]) -> tuple[str | None, list[str]]:
    """A command's positionals -> (at most one recipe path, the key=value overrides): every rlpt job's convention."""
    paths = [it for it in items if "=" not in it]
    if len(paths) > 1:
        raise ConfigError(f"unexpected argument {paths[1]!r}: give at most one recipe file, then key=value overrides")
    return (paths[0] if paths else None), [it for it in items if "=" in it]


def key_list(text: str) -> tuple[str, ...]:
    """`--allow-change a.b,c` -> ('a.b', 'c'): the config keys (or sections) an option names."""
    return tuple(k for k in text.split(",") if k)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


SEED_MAX = 2 ** 32   # seeds are 32-bit: numpy's limit, and far inside torch's int64


class RunConfig(Section):
    name: str = Field("sft", min_length=1, description="folder under out_dir")
    out_dir: str = Field("runs", min_length=1)
    seed: int = Field(0, ge=0, lt=SEED_MAX)
    threads: int = Field(0, ge=0, description="torch threads; 0 = leave torch's default")
    progress: bool = True


class ModelConfig(Section):
    """gpt_mini's shape (see rlpt.gpt_mini.model.GPTConfig). vocab_size comes from the tokenizer."""
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_head: int = Field(4, ge=1)
    d_model: int = Field(128, ge=8)
    d_ff: int = Field(352, ge=1)
    max_seq_len: int = Field(64, ge=8)
    rope_theta: float = Field(10000.0, gt=0)
    # False: no rotary positions (NoPE): token order comes from the causal mask alone (and the operand index)
    rope: bool = True
    tie_embeddings: bool = True
    # > 0: rows of an operand-index embedding (rlpt.gpt_mini.model.operand_index: each token also embeds which `+`
    # term of the prompt, or which step of the response, it belongs to); 0: none. gpt_mini only.
    operand_index: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _shapes(self):
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        return self


class TaskConfig(Section):
    min_operands: int = Field(2, ge=1)
    max_operands: int = Field(4, ge=1)
    min_value: int = Field(0, ge=0)
    max_value: int = Field(9, ge=0)
    heldout_frac: float = Field(0.1, gt=0, lt=1)
    split_seed: int = Field(0, ge=0, lt=SEED_MAX)

    @model_validator(mode="after")
    def _ranges(self):
        if self.max_operands < self.min_operands:
            raise ValueError("task.max_operands must be >= task.min_operands")
        if self.max_value < self.min_value:
            raise ValueError("task.max_value must be >= task.min_value")
        return self


class OptimConfig(Section):
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _betas(self):
        if not all(0 <= b < 1 for b in self.betas):   # Adam's moment decays: torch.optim raises outside [0, 1)
            raise ValueError(f"betas must both be in [0, 1), got {list(self.betas)} (e.g. [0.9, 0.95])")
        return self


class EvalConfig(Section):
    every: int = Field(100, ge=1, description="held-out eval every N steps (and at the end)")
    size: int = Field(200, ge=1, description="number of held-out problems")
    pass_k: int = Field(4, ge=1, description="k of pass@k at the final eval")
    max_tokens: int = Field(40, ge=1)


class JobConfig(Section):
    """What every job has: where it writes, the model's shape, the task, and the checkpoint it starts from.
    Each job's schema (opening its own module: rlpt.sft.SFTJob, rlpt.train.TrainJob, ...) extends it."""
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    init_from: str | None = Field(None, description="checkpoint or run folder to start from")

    @model_validator(mode="after")
    def _prompt_fits(self):
        check_prompt_fits(self.task, self.model.max_seq_len)
        return self


def longest_prompt(operands: int, max_value: int) -> int:
    """Tokens in the longest prompt `<a+b+...>` of `operands` numbers up to `max_value`
    (rlpt.gpt_mini.task.Problem.prompt; one character, one token)."""
    return 2 + operands * len(str(max_value)) + operands - 1


def check_prompt_fits(task: TaskConfig, max_seq_len: int, operands: int | None = None,
                      key: str = "task.max_operands") -> None:
    """A prompt must leave the model room to answer: else sampling, SFT and eval fail mid-run.
    `operands`: a slice with more operands than the task's (the pipeline's hard slice, config key `key`)."""
    operands = operands or task.max_operands
    n = longest_prompt(operands, task.max_value)
    if n >= max_seq_len:
        raise ValueError(f"the longest prompt has {n} tokens ({key}={operands}, task.max_value={task.max_value}) "
                         f"but model.max_seq_len={max_seq_len} leaves no room to answer: raise model.max_seq_len "
                         f"or lower {key} / task.max_value")


class LoopConfig(Section):
    """What the supervised job skeleton (rlpt.loop.SupervisedLoop) reads: SFT, DPO and the reward model
    extend it with their own data settings and defaults."""
    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=1)
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    optim: OptimConfig = OptimConfig()


class SFTConfig(LoopConfig):
    format: Literal["direct", "cot", "tool"] = Field(
        "direct", description="tool: calculator tool-use traces, tool reply masked (registered by rlpt.envs)")
    cot_frac: float = Field(0.0, ge=0, le=1, description="share of demonstrations written as a chain of thought "
                            "instead of sft.format (a 'base model' that saw some worked sums: recipes/r1_zero.yaml)")
    data_file: str | None = Field(None, description="a JSONL file of demonstrations {\"prompt\": ..., \"response\": "
                                  "...} to train on instead of the task's own (rlpt.sft.load_demonstrations)")
    operand_offset: int = Field(0, ge=0, description="with model.operand_index: each row's operand indices shifted by "
                                "a random 0..operand_offset, so index rows past the demonstrations' operand count are "
                                "trained too (Abacus' random offset; docs/pipeline.md)")


Job = TypeVar("Job", bound=BaseModel)


def _valid_keys(cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, f in cls.model_fields.items():
        keys.append(prefix + name)
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _valid_keys(ann, prefix + name + ".")
    return keys


MAX_ERRORS = 5   # problems listed in one message; the rest are counted


def _format_error(cls: type[BaseModel], err: ValidationError, source: str) -> str:
    lines = []
    valid = _valid_keys(cls)
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f". Did you mean '{close[0]}'?" if close else ""
            lines.append(f"unknown config key {quote(key)}{hint}")
        elif e["type"] == "value_error" or not key:
            msg = one_line(e["msg"].removeprefix("Value error, "))
            lines.append(msg if not key or key in msg else f"{key}: {msg}")   # a section's own check: say whose
        else:
            lines.append(f"config key '{key}': {e['msg']} (got {quote(e.get('input'))})")
    more = f"; and {len(lines) - MAX_ERRORS} more" if len(lines) > MAX_ERRORS else ""
    return f"invalid config ({source}): " + "; ".join(lines[:MAX_ERRORS]) + more


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {quote(item)} is not of the form key.sub=value (for example sft.steps=200)")
    key, raw = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(k.strip() for k in keys):
        raise ConfigError(f"override {quote(item)} has an empty key part: write key.sub=value (for example "
                          "sft.steps=200)")
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else ""
    except DuplicateKeyError as e:
        raise ConfigError(f"override {quote(item)}: {e}") from None
    except (yaml.YAMLError, ValueError):   # not YAML (or an int past Python's 4300-digit limit): the raw string
        value = raw
    return keys, value


# The model_dump context of load_config's starting point. A section that a key chooses (the algorithm's: its
# keys are those of the algorithm it names) dumps only that key here, so a recipe naming another choice does
# not inherit the default choice's keys (see rlpt.train.TrainStage).
DEFAULTS = {"defaults": True}


def load_config(cls: type[Job], path: str | Path | None = None, overrides: list[str] = (),
                base: dict | None = None) -> Job:
    """defaults < base < the recipe at `path` < overrides, validated as `cls`."""
    # Start from the job's own defaults, so a partial override of a section whose defaults differ
    # from its class's (e.g. the RL trainer's optimizer) keeps the rest of that section's defaults.
    data = deep_merge(cls().model_dump(context=DEFAULTS), base or {})
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    data = apply_overrides(data, overrides)
    src = quote(str(path)) if path else "defaults"
    src += " + overrides" if overrides else ""
    try:
        job = cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(cls, e, src)) from None
    bad = unrepresentable(job.model_dump())   # also reaches sections that are not Sections (the algorithm's)
    if bad:
        key, value = bad
        why = ("every number must be finite" if isinstance(value, float) else
               "a string may not hold a NUL byte" if isinstance(value, str) else "integers must fit in 64 bits")
        raise ConfigError(f"invalid config ({src}): config key '{key}' is {quote(value, 40)}: {why}")
    return job


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """`a.b=value` items written into a copy of the nested dict `data`, in order (the last one wins)."""
    data = dict(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k, {}), dict):
                raise ConfigError(f"override {quote(item)}: {quote(k)} is a value, not a section")
            node[k] = dict(node.get(k, {}))
            node = node[k]
        node[keys[-1]] = value
    return data


def lookup(keys: list[str], default: Any, layers: list[dict], overrides: list[str] = ()) -> Any:
    """The value `keys` will have once `layers` (lowest first) and `overrides` are merged, read before
    validation: what a loader picks further defaults by (e.g. the algorithm a recipe names)."""
    value = default
    for layer in [*layers, apply_overrides({}, overrides)]:
        node = layer
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        value = value if node is None else node
    return value


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dump_config(cfg: BaseModel) -> str:
    """Every field written out, what-and-where sections first (run, model, task, env, init_from)."""
    data = cfg.model_dump(mode="json")
    first = [k for k in ("run", "model", "task", "env", "init_from") if k in data]
    return yaml.safe_dump({**{k: data[k] for k in first}, **data}, sort_keys=False)
