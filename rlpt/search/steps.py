"""Steps of an arithmetic chain of thought: where they end, and whether each is right (lesson 17).

    "3+4=7,7+5=12#"  ->  steps ["3+4=7,", "7+5=12#"]     boundaries: the `,` and the final `#` (EOS)
    step k is right  iff it reads a+x=c with a = the previous result (the first operand for k = 0),
                     x = operand k+1 and c = a + x;  a prefix is right iff every step in it is

One definition of a step, used at labelling, training and search time alike (search-and-learn and
Math-Shepherd break when the three disagree: a PRM trained on `ки` tags reads nothing at `\\n\\n`). A step
keeps its delimiter, so `"".join(split_steps(t)) == t` and a process reward model reads its score at the
delimiter token itself (TRL's PRMTrainer puts the label on a step's last token the same way).

The exact truth exists only because the task is arithmetic: it is for *measuring* Monte-Carlo labels,
PRMs and search, never an input to them.
"""
from __future__ import annotations

import re

from rlpt.gpt_mini.task import Problem, verify
from rlpt.gpt_mini.tokenizer import EOS

SEP = ","            # ends every step but the last
END = EOS            # ends the last step (the policy's end of turn)
_STEP = re.compile(r"(\d+)\+(\d+)=(\d+)")


def split_steps(text: str) -> list[str]:
    """A response -> its steps, each with its delimiter (`,` or the final `#`); a tail cut by the token
    limit is a last step without one. Nothing after `#` belongs to the response."""
    if END in text:
        text = text[:text.index(END) + 1]
    steps, start = [], 0
    for i, ch in enumerate(text):
        if ch in (SEP, END):
            steps.append(text[start:i + 1])
            start = i + 1
    if start < len(text):
        steps.append(text[start:])
    return steps


def step_ends(ids: list[int], sep_id: int, end_id: int) -> list[int]:
    """Response token ids -> the positions (response-local) of its step delimiters, up to the first EOS."""
    out = []
    for i, t in enumerate(ids):
        if t == sep_id or t == end_id:
            out.append(i)
            if t == end_id:
                break
    return out


def is_complete(text: str) -> bool:
    """The response ended its turn (its last step carries the EOS)."""
    return text.endswith(END)


def step_right(problem: Problem, steps: list[str], k: int) -> bool:
    """Step k alone: `a+x=c` with a the previous step's result (operand 0 for k = 0), x operand k+1,
    c = a + x, and the delimiter that fits (`#` only on the last addition). One operand: the answer itself."""
    ops, body = problem.operands, steps[k]
    last = k == len(ops) - 2
    if len(ops) == 1:
        return k == 0 and body == f"{ops[0]}{END}"
    if not body.endswith(END if last else SEP) or k > len(ops) - 2:
        return False
    m = _STEP.fullmatch(body[:-1])
    if m is None:
        return False
    a, x, c = map(int, m.groups())
    prev = ops[0] if k == 0 else _result(steps[k - 1])
    return a == prev and x == ops[k + 1] and c == a + x


def _result(step: str) -> int | None:
    m = _STEP.fullmatch(step[:-1]) if step and step[-1] in (SEP, END) else None
    return int(m.group(3)) if m else None


def true_step_labels(problem: Problem, text: str) -> list[bool]:
    """Exact prefix truth, one per step: True iff steps 0..k are all right (the first error dooms the rest)."""
    steps, ok, out = split_steps(text), True, []
    for k in range(len(steps)):
        ok = ok and step_right(problem, steps, k)
        out.append(ok)
    return out


def outcome(problem: Problem, text: str) -> bool:
    """The verifier: the response's last integer is the sum (what RL and every accuracy here count)."""
    return verify(text, problem.gold) == 1.0
