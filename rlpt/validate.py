"""The checks under every config and every input file: one-line errors, quoting user values safely, YAML that
may not repeat a key, numbers that must be finite and fit in 64 bits (rlpt.config builds typed configs on these).

    read_yaml("recipes/grpo_arith.yaml")      # a mapping, or a ConfigError naming the file and what is wrong
    quote(value)                              # what an error quotes user input with: cut to QUOTE_CHARS
"""
from __future__ import annotations

import math
import reprlib
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem, phrased for the person who wrote the config (one line: the CLI prints it as is)."""


QUOTE_CHARS = 200   # the most of any user value an error message quotes


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """repr(value) in at most about `limit` characters: what errors quote user input with. A long string says
    its length; a container is abbreviated without being written out whole (it may be a YAML alias bomb)."""
    if isinstance(value, str):
        r = repr(value[:limit + 1])
        return r if len(value) <= limit else f"{r[:limit]}... ({len(value)} chars)"
    if isinstance(value, int) and not isinstance(value, bool):   # repr() refuses ints past 4300 digits
        digits = int(value.bit_length() * math.log10(2)) + 1
        return repr(value) if digits <= limit else f"an integer of about {digits} digits"
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 3, limit // 4, limit // 4, limit // 4
    r = short.repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


def one_line(msg: str) -> str:
    """A message as one line: line breaks (and the indents after them) become '; ' (' ' after a colon)."""
    out = ""
    for part in (p.strip() for p in str(msg).splitlines()):
        if part:
            out += ("" if not out else " " if out.endswith(":") else "; ") + part
    return out


class DuplicateKeyError(yaml.YAMLError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping repeating a key (SafeLoader keeps the last one, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue   # an unhashable key: SafeLoader's own error names it
            if key in seen:
                raise DuplicateKeyError(f"key {quote(key)} appears twice (lines {seen[key] + 1} and "
                                        f"{key_node.start_mark.line + 1}): keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, UniqueKeyLoader.construct_mapping)


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file's contents; a file in another encoding is a ConfigError naming the first bad byte."""
    p = Path(path)
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError(f"{what} {quote(str(p))} is not UTF-8 text (byte {e.object[e.start]:#04x} on line "
                          f"{line}): save it as UTF-8") from None


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {quote(str(p))} does not exist (or is not a file); "
                          "pass an existing YAML file, for example one under recipes/")
    text = read_text(p, "config file")
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader) or {}
    except DuplicateKeyError as e:
        raise ConfigError(f"config file {quote(str(p))}: {e}") from None
    except (yaml.YAMLError, ValueError) as e:   # ValueError: an int past Python's 4300-digit limit
        raise ConfigError(f"config file {quote(str(p))} is not valid YAML: {one_line(quote(str(e), 400))}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {quote(str(p))} must hold a mapping of keys, not a {type(data).__name__}")
    return data


INT64 = 2 ** 63


def unrepresentable(data: Any, key: str = "") -> tuple[str, Any] | None:
    """The first (key, value) of a dumped config that is a non-finite float, an int beyond int64, or a
    string with a NUL byte; None when there is none."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    else:
        bad = (isinstance(data, float) and not math.isfinite(data)) or \
              (isinstance(data, int) and not -INT64 <= data < INT64) or (isinstance(data, str) and "\0" in data)
        return (key, data) if bad else None
    for k, v in items:
        found = unrepresentable(v, f"{key}.{k}" if key else str(k))
        if found:
            return found
    return None
