"""The shared verifiable task: add a few integers.

    prompt  "<3+4+5>"      gold 12
    direct  "12#"          chain of thought  "3+4=7,7+5=12#"   (the last integer is the answer)
    reward  1 if last_integer(response) == gold else 0          (the shared task of lessons 09–14)

Prompts are drawn from a seeded generator, so the same `TaskConfig` gives the same problems on any
machine. The train / held-out split is a pure function of the problem's operand multiset (a keyed
hash of the sorted operands), so the two sets are disjoint by construction, whatever was sampled, a
held-out prompt can never be drawn for training, and neither can a reordering of it: "<3+4>" and
"<4+3>" are the same sum and fall on the same side. (Hashing the prompt text split them: 492 of the
500 problems of `heldout_set(500)` had a reordered twin in training, so held-out accuracy measured
new orderings of seen multisets rather than new sums; docs/data.md.)
"""
from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from rlpt.config import ConfigError
from rlpt.gpt_mini.tokenizer import EOS

_INT = re.compile(r"\d+")


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return "<" + "+".join(map(str, self.operands)) + ">"

    @property
    def gold(self) -> int:
        return sum(self.operands)

    def direct(self) -> str:
        return f"{self.gold}{EOS}"

    def cot(self) -> str:
        """Partial sums, one addition at a time: 3+4=7,7+5=12#. One operand has no step: `5#`."""
        if len(self.operands) == 1:
            return self.direct()
        steps, acc = [], self.operands[0]
        for x in self.operands[1:]:
            steps.append(f"{acc}+{x}={acc + x}")
            acc += x
        return ",".join(steps) + EOS

    def response(self, fmt: str) -> str:
        if fmt == "direct":
            return self.direct()
        if fmt == "cot":
            return self.cot()
        raise ValueError(f"unknown response format {fmt!r}: use 'direct' or 'cot'")


def last_integer(text: str) -> int | None:
    """The last run of digits in `text` (no sign: '-12' reads as 12, fine for non-negative sums)."""
    found = _INT.findall(text)
    return int(found[-1]) if found else None


def verify(response: str, gold: int) -> float:
    """1.0 if the response's last integer equals gold, else 0.0. Lenient about any text before it."""
    return 1.0 if last_integer(response) == gold else 0.0


def parse_prompt(prompt: str) -> Problem:
    m = re.fullmatch(r"<(\d+(?:\+\d+)*)>", prompt)
    if not m:
        raise ValueError(f"not an arithmetic prompt: {prompt!r} (expected like '<3+4+5>')")
    return Problem(tuple(int(x) for x in m.group(1).split("+")))


class ArithmeticTask:
    """Problems with `min_operands..max_operands` operands, each in `min_value..max_value`."""

    def __init__(self, min_operands: int = 2, max_operands: int = 4, min_value: int = 0,
                 max_value: int = 9, heldout_frac: float = 0.1, split_seed: int = 0):
        if not 1 <= min_operands <= max_operands:
            raise ValueError("task.min_operands must be >= 1 and <= task.max_operands")
        if not 0 <= min_value <= max_value:
            raise ValueError("task.min_value must be >= 0 and <= task.max_value")
        self.min_operands, self.max_operands = min_operands, max_operands
        self.min_value, self.max_value = min_value, max_value
        self.heldout_frac, self.split_seed = heldout_frac, split_seed
        n_values = max_value - min_value + 1
        self.num_distinct = sum(n_values ** n for n in range(min_operands, max_operands + 1))

    def is_heldout(self, p: Problem) -> bool:
        """A keyed hash of the sorted operands below heldout_frac: every ordering of a multiset on one side."""
        key = "+".join(map(str, sorted(p.operands)))
        h = hashlib.blake2b(f"{self.split_seed}:{key}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2 ** 64 < self.heldout_frac

    def _draw(self, rng: random.Random) -> Problem:
        n = rng.randint(self.min_operands, self.max_operands)
        return Problem(tuple(rng.randint(self.min_value, self.max_value) for _ in range(n)))

    def sample(self, rng: random.Random, split: str = "train") -> Problem:
        """One problem from `split` ('train' or 'heldout'), by rejection on the split hash."""
        want_heldout = {"train": False, "heldout": True}[split]
        for _ in range(100_000):
            p = self._draw(rng)
            if self.is_heldout(p) == want_heldout:
                return p
        raise RuntimeError(f"could not draw a {split} problem: check task.heldout_frac={self.heldout_frac}")

    def heldout_set(self, n: int, seed: int = 1234) -> list[Problem]:
        """`n` distinct held-out problems (fewer if the split has fewer), fixed by `seed`."""
        rng, seen, out = random.Random(seed), set(), []
        budget = 50 * n + 1000
        while len(out) < n and budget:
            budget -= 1
            p = self.sample(rng, "heldout")
            if p not in seen:
                seen.add(p)
                out.append(p)
        return out


def make_task(cfg) -> ArithmeticTask:
    """The task a `TaskConfig` (rlpt.config) describes."""
    return ArithmeticTask(**cfg.model_dump())


# -- response formats beyond 'direct' and 'cot' (registered from above, like envs) -------------------
@dataclass(frozen=True)
class TraceFormat:
    """A demonstration format whose response carries a per-character loss mask (0 = text the policy does
    not produce, e.g. a tool's reply). `env` names the environment that answers the model at evaluation
    (the calculator for 'tool': a tool-using model answers nothing without its tool); `check(problems,
    max_tokens)` raises a ConfigError before training when that evaluation could not work."""
    trace: Callable[[Problem], tuple[str, list[float]]]
    env: str
    check: Callable[[list[Problem], int], None] | None = None


TRACE_FORMATS: dict[str, TraceFormat] = {}
PLAIN_FORMATS = ("direct", "cot")


def register_trace_format(name: str, fmt: TraceFormat) -> None:
    TRACE_FORMATS[name] = fmt


def trace_format(fmt: str) -> TraceFormat | None:
    """None for the plain formats ('direct', 'cot'); else the registered format, or a ConfigError naming the key."""
    if fmt in PLAIN_FORMATS:
        return None
    if fmt not in TRACE_FORMATS:
        raise ConfigError(f"sft.format={fmt!r} is not registered (known: 'direct', 'cot', {sorted(TRACE_FORMATS)}); "
                         "trace formats such as 'tool' are registered by importing rlpt.envs")
    return TRACE_FORMATS[fmt]


def demonstration(p: Problem, fmt: str) -> tuple[str, list[float] | None]:
    """The SFT target for `p` in format `fmt`: (response text, per-character mask or None = all ones)."""
    tf = trace_format(fmt)
    return tf.trace(p) if tf else (p.response(fmt), None)
