"""Calculator arithmetic: a multi-turn env whose tool evaluates `c(<expr>)` (lesson 08 toy task).

    prompt <123+456+789>
    policy let me compute c(123+456+789)#      env  =1368#        (tool output: mask 0)
    policy the answer is 1368#                  env  done, reward verify(text, 1368) = 1

An assistant turn containing `c(` is a tool call; the env answers `=<value>#`, or `=error <why>#`
for a malformed call, a nested call, parentheses deeper than `MAX_DEPTH`, a number longer than
`MAX_DIGITS`, a result beyond `MAX_ABS`, or division by zero. A bad call is the tool's reply, never
an exception. A turn with no call is the final answer, checked with the arithmetic verifier (the
last integer equals the gold sum), and ends the episode. Tool replies earn nothing: only the final
answer is rewarded, so calling the tool is worth exactly what it does for that answer.

`evaluate` is a recursive-descent parser over integers, `+ - * /`, unary minus and parentheses,
never `eval`. `/` is floor division (Python's `//`).

Importing this module registers the SFT format `tool` (`rlpt sft sft.format=tool`): demonstrations
`c(123+456+789)#` `=1368#` `1368#` (`sft_tool_trace`) with the tool's reply masked out of the loss,
evaluated with this env (`rlpt.framework.evaluate` runs the calculator in the agent loop: a tool-using
model answers nothing without its tool).
"""
from __future__ import annotations

import re

from rlpt.config import ConfigError
from rlpt.framework.environment import ArithmeticEnv, Prompt, Verdict, register_env
from rlpt.gpt_mini.task import Problem, TraceFormat, register_trace_format, verify
from rlpt.gpt_mini.tokenizer import EOS

MAX_EXPR_CHARS = 80
MAX_DIGITS = 12
MAX_DEPTH = 4
MAX_ABS = 10 ** 18
_CALL = re.compile(r"c\(")


class ToolError(ValueError):
    """Why a tool call was refused; its message becomes the tool's reply."""


class _Parser:
    """expr := term (('+'|'-') term)* ;  term := factor (('*'|'/') factor)* ;
    factor := '-' factor | int | '(' expr ')'"""

    def __init__(self, text: str):
        self.s = text.replace(" ", "")
        self.i = 0
        self.depth = 0

    def parse(self) -> int:
        if not self.s:
            raise ToolError("empty")
        v = self.expr()
        if self.i != len(self.s):
            raise ToolError("malformed")
        return v

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def expr(self) -> int:
        v = self.term()
        while self.peek() in ("+", "-"):
            op = self.s[self.i]
            self.i += 1
            v = self.check(v + self.term() if op == "+" else v - self.term())
        return v

    def term(self) -> int:
        v = self.factor()
        while self.peek() in ("*", "/"):
            op = self.s[self.i]
            self.i += 1
            rhs = self.factor()
            if op == "/" and rhs == 0:
                raise ToolError("division by zero")
            v = self.check(v * rhs if op == "*" else v // rhs)
        return v

    def factor(self) -> int:
        ch = self.peek()
        if ch == "-":
            self.i += 1
            return -self.factor()
        if ch == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ToolError("too deep")
            self.i += 1
            v = self.expr()
            if self.peek() != ")":
                raise ToolError("malformed")
            self.i += 1
            self.depth -= 1
            return v
        m = re.match(r"\d+", self.s[self.i:])
        if not m:
            raise ToolError("malformed")
        if len(m.group()) > MAX_DIGITS:
            raise ToolError("number too long")
        self.i += len(m.group())
        return int(m.group())

    @staticmethod
    def check(v: int) -> int:
        if abs(v) > MAX_ABS:
            raise ToolError("result too big")
        return v


def evaluate(expr: str) -> int:
    """Integer value of `expr`, or ToolError. No eval, bounded recursion, bounded numbers."""
    if len(expr) > MAX_EXPR_CHARS:
        raise ToolError("expression too long")
    if "c" in expr:
        raise ToolError("nested call")
    if not re.fullmatch(r"[0-9+\-*/() ]*", expr):
        raise ToolError("malformed")
    return _Parser(expr).parse()


def find_call(text: str) -> str | None:
    """The argument of the first `c(...)` in `text` (balanced parentheses), '' for a call that never
    closes, None when the text makes no call."""
    m = _CALL.search(text)
    if not m:
        return None
    depth, start = 1, m.end()
    for j in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return text[start:j]
    raise ToolError("malformed")


def tool_reply(text: str) -> str | None:
    """What the calculator answers to an assistant turn: `=<value>#`, `=error <why>#`, or None (no call)."""
    try:
        arg = find_call(text)
        if arg is None:
            return None
        return f"={evaluate(arg)}{EOS}"
    except ToolError as e:
        return f"=error {e}{EOS}"


@register_env("calculator")
class CalculatorArithmeticEnv(ArithmeticEnv):
    """The arithmetic task with a calculator tool; `multi_turn` makes `rlpt.train` use the agent loop."""
    multi_turn = True

    def start(self, prompt: Prompt) -> dict:
        return {"gold": prompt.gold, "tool_calls": 0, "tool_errors": 0}

    def step(self, assistant_text: str, state: dict) -> tuple[str, float, bool, dict]:
        reply = tool_reply(assistant_text)
        if reply is not None:
            state["tool_calls"] += 1
            state["tool_errors"] += reply.startswith("=error")
            return reply, 0.0, False, {"tool_calls": state["tool_calls"], "tool_errors": state["tool_errors"]}
        v = self.verify(Prompt("", [], state["gold"]), assistant_text)
        return "", v.reward, True, {**v.info, "tool_calls": state["tool_calls"]}

    def verify(self, prompt: Prompt, response: str) -> Verdict:
        r = verify(response, prompt.gold)
        return Verdict(r, {"correct": r == 1.0})


def tool_use_trace(operands: tuple[int, ...], preamble: str = "let me compute ",
                   answer_prefix: str = "the answer is ") -> tuple[str, list[float]]:
    """An SFT demonstration of tool use for `<a+b+...>`: the response text and its per-character loss
    mask (1 = assistant, 0 = tool output), e.g. for (123, 456, 789):
    `let me compute c(123+456+789)#` `=1368#` `the answer is 1368#`  -> mask 30 ones, 6 zeros, 19 ones.
    SFT on it must use the mask too, or it teaches tool-output mimicry (lesson 08)."""
    call = f"{preamble}c({'+'.join(map(str, operands))}){EOS}"
    reply = tool_reply(call)
    answer = f"{answer_prefix}{sum(operands)}{EOS}"
    return call + reply + answer, [1.0] * len(call) + [0.0] * len(reply) + [1.0] * len(answer)


def sft_tool_trace(p: Problem) -> tuple[str, list[float]]:
    """The `sft.format=tool` demonstration: the bare trace `c(123+456+789)#` `=1368#` `1368#`.
    Not the lesson's wordy one: with `let me compute ` / `the answer is ` around the call, gpt_mini (4×128)
    learned no copying in 300 SFT steps on 3-digit operands (loss stuck at 0.52 per token, held-out 0.00),
    while the bare trace reached 0.54 held-out at step 100 and 0.88 at step 200 (same lr, batch 64)."""
    return tool_use_trace(p.operands, preamble="", answer_prefix="")


def check_eval_budget(problems: list[Problem], max_tokens: int) -> None:
    """eval.max_tokens must hold the longest tool-use answer (tool output included), or every eval scores 0."""
    longest = max((len(sft_tool_trace(p)[0]) for p in problems), default=0)
    if max_tokens < longest:
        raise ConfigError(f"eval.max_tokens={max_tokens} is shorter than a tool-use answer to these problems "
                          f"({longest} tokens, tool output included): raise eval.max_tokens to at least {longest}")


register_trace_format("tool", TraceFormat(sft_tool_trace, env="calculator", check=check_eval_budget))
