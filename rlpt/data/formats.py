"""Published prompt sets as rows: GSM8K and MATH records, with the fields those datasets publish.

    gsm8k   {"question": "...", "answer": "...reasoning...\\n#### 1,200"}      gold = "1200" (after ####, no commas)
    math    {"problem": "...", "solution": "... \\boxed{\\frac{3}{4}}", "level": "Level 3", "type": "Algebra"}
            gold = the last \\boxed{...} of the solution ("\\frac{3}{4}"); level and type into metadata

    rows = read_prompt_set("gsm8k_train.jsonl", "gsm8k")      # JSONL, Parquet, hf:owner/name, a save_to_disk dir

A GSM8K row's reasoning (the text before ####) and a MATH row's solution go into metadata["solution"] (what a
cold-start SFT would imitate; RL reads only prompt and answer). MATH-500-style records (`answer`, `subject`,
`unique_id`) are read too: a given `answer` is the gold, `unique_id` the id. Unknown keys are refused (a typo is
not a silent default), and a record without its gold is an error naming the file and line.
"""
from __future__ import annotations

import json
import re
from typing import Any

from rlpt.config import ConfigError, quote
from rlpt.data.prompts import PromptRow, RowParser, parse_row, read_prompts

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
_GSM8K_KEYS = {"question", "answer", "id"}
_MATH_KEYS = {"problem", "solution", "level", "type", "subject", "answer", "unique_id", "id"}


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}, or MATH's rare brace-less `\\boxed 5`); None if none
    closes."""
    for m in reversed(list(_BOXED.finditer(text))):
        if m.group(1) is None:                       # \boxed 5$: up to the next space or $
            bare = re.match(r"\s*([^\s$]+)", text[m.end():])
            if bare:
                return bare.group(1)
            continue
        depth, start = 1, m.end()
        for j in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[start:j].strip()
    return None


def _bad(where: str, why: str, data: Any) -> ConfigError:
    return ConfigError(f"{where}: {why}: {quote(json.dumps(data, ensure_ascii=False))}")


def _record(data: Any, where: str, fmt: str, keys: set[str], required: tuple[str, ...]) -> dict:
    if not isinstance(data, dict):
        raise _bad(where, f"a {fmt} record must be an object with {' and '.join(required)}", data)
    unknown = sorted(set(data) - keys)
    if unknown:
        raise _bad(where, f"unknown key {unknown[0]!r} in a {fmt} record (known: {', '.join(sorted(keys))}; "
                          "a row of rlpt's own format needs data.format=rows)", data)
    for k in required:
        if not isinstance(data.get(k), str) or not data[k].strip():
            raise _bad(where, f"a {fmt} record needs a non-empty text {k!r}", data)
    return data


def _id(data: dict, key: str, default: str) -> str:
    return str(data[key]) if data.get(key) is not None else default


def gsm8k_row(data: Any, where: str, default_id: str, default_source: str) -> PromptRow:
    """{"question", "answer": "<reasoning>\\n#### <number>"} -> a row with gold = the number, commas stripped."""
    r = _record(data, where, "GSM8K", _GSM8K_KEYS, ("question", "answer"))
    reasoning, sep, final = r["answer"].rpartition("####")
    gold = final.strip().replace(",", "")
    if not sep or not gold:
        raise _bad(where, "a GSM8K answer must end with '#### <final answer>'", data)
    return PromptRow(id=_id(r, "id", default_id), prompt=r["question"].strip(), answer=gold, source=default_source,
                     metadata={"solution": reasoning.strip()})


def math_row(data: Any, where: str, default_id: str, default_source: str) -> PromptRow:
    """{"problem", "solution" with \\boxed{...}, "level", "type"} -> gold = the last boxed answer (or `answer`)."""
    r = _record(data, where, "MATH", _MATH_KEYS, ("problem", "solution"))
    given = r.get("answer")
    if given is not None and not (isinstance(given, str | int) and str(given).strip()):
        raise _bad(where, "a MATH record's 'answer', when given, must be non-empty text", data)
    gold = str(given).strip() if given is not None else last_boxed(r["solution"])
    if not gold:
        raise _bad(where, "a MATH solution needs a closed \\boxed{...} answer (or give 'answer')", data)
    meta = {k: r[k] for k in ("level", "type", "subject") if r.get(k) is not None}
    return PromptRow(id=_id(r, "unique_id", _id(r, "id", default_id)), prompt=r["problem"].strip(), answer=gold,
                     source=default_source, metadata={**meta, "solution": r["solution"]})


FORMATS: dict[str, RowParser] = {"rows": parse_row, "gsm8k": gsm8k_row, "math": math_row}


def read_prompt_set(where: str, fmt: str = "rows") -> list[PromptRow]:
    """The rows of a prompt set in format `fmt` (rows | gsm8k | math)."""
    if fmt not in FORMATS:
        raise ConfigError(f"prompt format {fmt!r} is not one of {', '.join(FORMATS)}")
    return read_prompts(where, FORMATS[fmt])
