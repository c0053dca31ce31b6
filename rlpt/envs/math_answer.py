"""Math answers checked by value, not by string: `math-verify` (Hugging Face) behind the env protocol.

    answer  = extract(response)      \\boxed{...}  >  "the answer is X"  >  the last number-like token
    reward  = 1 if math_verify.verify(parse(gold), parse(answer)) else 0

Why a CAS and not string equality (lesson 18, its verifier checklist): "1/2" vs "0.5" false negatives teach the
policy the gold's format instead of the math, and over-eager normalisation (stripping all
whitespace) lets "1 2" match 12. So exactly one answer is extracted (a response that lists many
candidates gets only its last one judged, never "any of them"), case and trailing whitespace and
the `#` EOS are dropped, and math-verify compares values: 3/4 = 0.75 = \\frac{3}{4} = 6/8.

A hostile answer costs at most `MAX_ANSWER_CHARS` and `VERIFY_TIME_S`: a longer answer scores 0 unparsed,
and parsing plus comparing run under one SIGALRM deadline (`setitimer`, sub-second; math-verify's own
whole-second alarm is switched off so the two do not cancel each other). Signals reach the main
thread only, so a verify called from another thread has the length cap but no time cap. What is
logged about a rejected answer is a preview of `PREVIEW_CHARS`, never the answer whole.

The built-in task adds two fractions, `<1/2+1/3>` with gold 5/6, so it fits gpt_mini's alphabet. A prompt set
replaces it: `rows` (PromptRow, rlpt/data: e.g. GSM8K or MATH records) are drawn at random for training and
`heldout_rows` are the held-out evaluation, in order. A prompt's ids come from the tokenizer's `encode_prompt`
when it has one (an HF tokenizer through its chat template, rlpt/models/chat.py), else `encode`.

    rlpt train model.hf_path=<dir> env.name=math data.prompts=train.jsonl data.format=gsm8k data.chat_template=true
"""
from __future__ import annotations

import contextlib
import logging
import random
import re
import signal
import threading
from fractions import Fraction

import math_verify.grader
import math_verify.parser
from math_verify import parse
from math_verify import verify as mv_verify

from rlpt.framework.environment import Environment, Prompt, Verdict, register_env

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*(.+)", re.I | re.S)
_MATH_SPAN = re.compile(r"\$+([^$]+)\$+")
# 1,200 (GSM8K writes thousands so) is one number; a comma not followed by exactly three digits separates two
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?![\d,])(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
MAX_ANSWER_CHARS = 256        # longer than any honest answer to a problem with a short gold
VERIFY_TIME_S = 1.0           # parse + compare, per answer
PREVIEW_CHARS = 80
RETRY_S = 0.05                # the deadline's alarm repeats this often until it is honoured
log = logging.getLogger(__name__)
# our deadline replaces math-verify's alarm (off below), so its warning that no timeout is set does not apply
math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True


def _boxed(text: str) -> str | None:
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    m = matches[-1]                     # the last \boxed{...} is the answer
    depth, start = 1, m.end()
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[start:j]
    return None


def extract_answer(response: str) -> str | None:
    """The one answer a response gives, as text (None if it gives none)."""
    text = response.replace("#", " ").strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = _ANSWER_IS.search(text)
    if m:
        text = m.group(1).strip().rstrip(".").strip()
    spans = _MATH_SPAN.findall(text)
    if spans:                               # LaTeX in $...$: the last span
        return spans[-1].strip()
    if "\\" in text:                        # bare LaTeX (\frac{3}{4}): the whole remaining text
        return text
    nums = _NUMBER.findall(text)
    return nums[-1].replace(" ", "").replace(",", "") if nums else None


def _as_math(s: str):
    return parse(f"${s}$", parsing_timeout=None) or parse(s, parsing_timeout=None)


def is_equivalent(answer: str, gold: str) -> bool:
    """Same value per math-verify (fractions, decimals, LaTeX, equivalent expressions). No time cap of its own."""
    a, g = _as_math(answer), _as_math(gold)
    return bool(a) and bool(g) and bool(mv_verify(g, a, timeout_seconds=None))


def preview(text: str, n: int = PREVIEW_CHARS) -> str:
    """What a log line may quote of an untrusted answer."""
    return text if len(text) <= n else f"{text[:n]!r}... ({len(text)} chars)"


class VerifyTimeout(BaseException):
    """Raised by the SIGALRM deadline; a BaseException so math-verify's `except Exception` cannot swallow it."""


@contextlib.contextmanager
def time_cap(seconds: float):
    """Raise VerifyTimeout in the block after `seconds` of wall clock (main thread; elsewhere no cap)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise VerifyTimeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    # the alarm repeats every RETRY_S until the block ends: a bare `except:` in the code it interrupts (sympy has
    # some) may swallow one VerifyTimeout, and a one-shot alarm would then never fire again (a CI run hung so)
    signal.setitimer(signal.ITIMER_REAL, seconds, RETRY_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def verify_math(response: str, gold: str, max_chars: int = MAX_ANSWER_CHARS,
                time_s: float = VERIFY_TIME_S) -> tuple[float, dict]:
    ans = extract_answer(response)
    if ans is None:
        return 0.0, {"correct": False, "answer": None}
    if len(ans) > max_chars:
        log.warning("math answer longer than %d chars, scored 0 unparsed: %s", max_chars, preview(ans))
        return 0.0, {"correct": False, "answer": preview(ans), "reject": f"answer longer than {max_chars} chars"}
    try:
        with time_cap(time_s):
            ok = is_equivalent(ans, gold)
    except VerifyTimeout:
        log.warning("math answer took over %gs to verify, scored 0: %s", time_s, preview(ans))
        return 0.0, {"correct": False, "answer": preview(ans), "reject": f"verify over {time_s:g}s"}
    return float(ok), {"correct": ok, "answer": ans}


def _problem(row) -> tuple:
    """(text, gold), or (text, gold, system) for a row with its own system message."""
    return (row.prompt, row.answer) if row.system is None else (row.prompt, row.answer, row.system)


@register_env("math")
class MathAnswerEnv(Environment):
    """`<a/b+c/d>` -> the sum as any equivalent form. `problems` (text, gold) or `rows` (PromptRow) replace the
    built-in task; `heldout_rows` (PromptRow) are then the held-out set (else it is drawn like training)."""

    def __init__(self, problems: list[tuple[str, str]] | None = None, seed: int = 0, tokenizer=None,
                 max_den: int = 6, rows: list | None = None, heldout_rows: list | None = None, **_):
        if rows is not None:
            if not rows:
                raise ValueError("the math env got an empty prompt set (no training rows)")
            problems = [_problem(r) for r in rows]
        self.problems = problems
        self.heldout_problems = [_problem(r) for r in heldout_rows] if heldout_rows else None
        self.tokenizer = tokenizer
        self.max_den = max_den
        self.rng = random.Random(seed)

    def _make(self, rng: random.Random) -> tuple[str, str]:
        if self.problems:
            return self.problems[rng.randrange(len(self.problems))]
        a, b = rng.randint(1, self.max_den), rng.randint(1, self.max_den)
        x, y = rng.randint(1, a), rng.randint(1, b)
        s = Fraction(x, a) + Fraction(y, b)
        return f"<{x}/{a}+{y}/{b}>", str(s)

    def _prompt(self, text: str, gold: str, system: str | None = None) -> Prompt:
        encode = getattr(self.tokenizer, "encode_prompt", None) or getattr(self.tokenizer, "encode", None)
        try:
            ids = [] if encode is None else encode(text, system) if system is not None else encode(text)
        except ValueError:
            ids = []
        return Prompt(text, ids, gold)

    def reset(self, split: str = "train") -> Prompt:
        return self._prompt(*self._make(self.rng))

    def verify(self, prompt: Prompt, response: str) -> Verdict:
        r, info = verify_math(response, str(prompt.gold))
        return Verdict(r, info)

    def heldout(self, n: int) -> list[Prompt]:
        if self.heldout_problems:
            return [self._prompt(*p) for p in self.heldout_problems[:n]]
        rng = random.Random(1234)
        return [self._prompt(*self._make(rng)) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
