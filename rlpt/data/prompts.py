"""Prompt sets: validated rows, read from JSONL (always), Parquet (with pyarrow) or a Hugging Face dataset
(with `datasets`: `hf:owner/name`, or a local `save_to_disk` directory), written as JSONL.

    {"id": "arith-17", "prompt": "<3+4+5>", "answer": "12", "source": "arith", "metadata": {"operands": 3}}
    {"prompt": "What is 3+4?", "answer": "7", "system": "Answer with a number."}   # optional: a system message

A row is what RL consumes (lesson 18a: in RL the dataset is prompts only): the text the policy sees, the gold
answer the verifier checks, where it came from (counted per source in every report: "it's a mix" with no
numbers is the course's stage-1 alarm), free metadata and an optional system message (the chat template's, for
that row alone: it replaces `data.system`). `id` defaults to `<file stem>-<line>` and `source`
to the file stem, so a bare `{"prompt": ..., "answer": ...}` file is a prompt set. A bad row stops the read
with one line naming the file and line and quoting the row (at most 200 characters).

Every reader takes `parse` (record, where, default id, default source) -> PromptRow: `parse_row` for rows as
above, or a published dataset's own fields (rlpt/data/formats.py: GSM8K, MATH).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rlpt.config import ConfigError, quote


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str
    answer: str
    source: str = ""
    metadata: dict = field(default_factory=dict)
    system: str | None = None

    def to_json(self) -> str:
        d = asdict(self)
        if d["system"] is None:     # a row without one is written as before
            del d["system"]
        return json.dumps(d, ensure_ascii=False)


class _RowSchema(BaseModel):
    """What a row on disk may hold: unknown keys are refused (a typo like "anwser" is not a silent default)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str | int | None = None
    prompt: str = Field(min_length=1)
    answer: str | int
    source: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    system: str | None = None

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the prompt is blank")
        return v


_PUBLISHED = {"question": "gsm8k", "problem": "math"}   # a published record's key -> its format (data/formats.py)


def _error_text(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "row"
        msg = "unknown key (known: id, prompt, answer, source, metadata, system)" if err["type"] == "extra_forbidden" \
            else err["msg"]
        if err["type"] == "extra_forbidden" and where in _PUBLISHED:
            msg += f"; a {_PUBLISHED[where]} record? read it as format {_PUBLISHED[where]} (data.format)"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def parse_row(data: Any, where: str, default_id: str, default_source: str) -> PromptRow:
    """One row from a decoded record; a ConfigError naming `where` (file:line) if it is not a prompt row."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a prompt row must be a JSON object with prompt and answer, got {quote(data)}")
    try:
        r = _RowSchema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: bad prompt row ({_error_text(e)}): {quote(json.dumps(data))}") from None
    return PromptRow(id=str(r.id) if r.id is not None else default_id, prompt=r.prompt, answer=str(r.answer),
                     source=r.source if r.source is not None else default_source, metadata=r.metadata,
                     system=r.system)


RowParser = Callable[[Any, str, str, str], PromptRow]


def read_jsonl(path: str | Path, parse: RowParser = parse_row) -> list[PromptRow]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"no prompt file {quote(str(path))}: give a JSONL file of prompt rows") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{quote(str(path))} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e.msg}): {quote(line)}") from None
        rows.append(parse(data, where, f"{path.stem}-{i}", path.stem))
    return _unique_ids(rows, str(path))


def read_parquet(path: str | Path, parse: RowParser = parse_row) -> list[PromptRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"reading {quote(str(path))} needs pyarrow, which is not installed: `pip install pyarrow`, "
                          "or convert the file to JSONL") from None
    path = Path(path)
    records = pq.read_table(path).to_pylist()
    rows = [parse(rec, f"{path}:row {i}", f"{path.stem}-{i}", path.stem) for i, rec in enumerate(records, 1)]
    return _unique_ids(rows, str(path))


def _datasets(name: str):
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"reading the Hugging Face dataset {quote(name)} needs `datasets`, which is not installed: "
                          "`pip install datasets`, or export the rows to JSONL") from None
    return datasets


def read_hf(name: str, split: str = "train", parse: RowParser = parse_row) -> list[PromptRow]:
    """A Hugging Face dataset by name (`hf:owner/name` on the command line), or a local directory written by
    `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (its `split`)."""
    datasets = _datasets(name)
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(f"{quote(name)} has the splits {sorted(ds)}, not {quote(split)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, split=split)
    stem = name.rstrip("/").rsplit("/", 1)[-1]
    rows = [parse(rec, f"{name}[{split}]:row {i}", f"{stem}-{i}", stem) for i, rec in enumerate(ds, 1)]
    return _unique_ids(rows, name)


def read_prompts(where: str | Path, parse: RowParser = parse_row) -> list[PromptRow]:
    """Rows from `*.jsonl`, `*.parquet`, `hf:owner/name` or a `save_to_disk` directory."""
    s = str(where)
    if s.startswith("hf:"):
        return read_hf(s[3:], parse=parse)
    if s.endswith(".parquet"):
        return read_parquet(s, parse)
    if Path(s).is_dir():
        if not any((Path(s) / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            raise ConfigError(f"{quote(s)} is a directory but not a Hugging Face dataset written by save_to_disk "
                              "(no dataset_info.json / dataset_dict.json): give a .jsonl or .parquet file")
        return read_hf(s, parse=parse)
    return read_jsonl(s, parse)


def write_prompts(path: str | Path, rows: list[PromptRow]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.to_json() + "\n" for r in rows), encoding="utf-8")
    return path


def _unique_ids(rows: list[PromptRow], what: str) -> list[PromptRow]:
    seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        if r.id in seen:
            raise ConfigError(f"{what}: id {quote(r.id)} is used by two rows (rows {seen[r.id] + 1} and {i + 1}): "
                              "ids must be unique")
        seen[r.id] = i
    return rows
