"""Accuracy plus a format reward: DeepSeek-R1-Zero's two rule-based rewards on the arithmetic task (lesson 23).

    reward = accuracy − c · (1 − well_formed)        accuracy = 1[last integer == gold],  c = FORMAT_COEF = 0.5

R1-Zero (DeepSeek-AI 2025, arXiv 2501.12948 §2.2.2) trains on two rewards and no reward model: an accuracy
reward (the verifier) and a format reward for putting the reasoning between `<think>` and `</think>`. gpt_mini's
alphabet has no tags, so here "well formed" is the task's own chain of thought: one or more steps `a+b=c`
joined by commas, ending with EOS (`3+4=7,7+5=12#`). A bare answer (`12#`), a truncated chain (no EOS), text
around the steps, or a step that is not `number+number=number` is not well formed. Whether the sums are right
is the accuracy reward's business, not the format's: `3+4=8,8+5=13#` is well formed and wrong.

The bonus is written as a penalty for a missing format: r = accuracy + c·well_formed − c. Group-normalised
advantages (GRPO, DAPO, RLOO) are unchanged by the constant −c, and `reward > 0` still means "correct", so
`acc/heldout` (the fraction of held-out answers with reward > 0) stays the honest accuracy. The four cases:

    correct, well formed   1.0        correct, bare answer   0.5
    wrong, well formed     0.0        wrong, bare answer    −0.5

A wrong chain outscores a wrong bare answer: the format reward pays for showing the work, which is how R1-Zero's
base model was pushed to reason at length (and why the paper's chains grew while accuracy rose).

    rlpt train env.name=format [env.format_coef=0.5] [key=value ...]          rlpt recipe recipes/r1_zero.yaml
"""
from __future__ import annotations

import re

from rlpt.framework.environment import ArithmeticEnv, Prompt, Verdict, register_env
from rlpt.gpt_mini.task import verify
from rlpt.gpt_mini.tokenizer import EOS

FORMAT_COEF = 0.5
_STEP = r"\d+\+\d+=\d+"
_CHAIN = re.compile(rf"{_STEP}(?:,{_STEP})*{re.escape(EOS)}")


def well_formed(response: str) -> bool:
    """A chain of thought `a+b=c,c+d=e#`: at least one step, steps joined by commas, nothing else, ended by EOS."""
    return _CHAIN.fullmatch(response) is not None


def format_reward(response: str, gold: int, coef: float = FORMAT_COEF) -> float:
    """accuracy − coef·(1 − well_formed)."""
    return verify(response, gold) - coef * (not well_formed(response))


@register_env("format")
class FormatEnv(ArithmeticEnv):
    """Arithmetic prompts; reward = accuracy with a format term (module doc). info: correct, well_formed.
    `format_coef` is c (env.format_coef), in [0, 1) so that reward > 0 still means correct."""

    def __init__(self, task=None, seed: int = 0, tokenizer=None, format_coef: float = FORMAT_COEF):
        if not 0 <= format_coef < 1:
            raise ValueError(f"format_coef={format_coef} must be in [0, 1): at 1 or more a correct bare answer "
                             "scores <= 0, and reward > 0 no longer means correct")
        super().__init__(task, seed, tokenizer)
        self.format_coef = format_coef

    def verify(self, prompt: Prompt, response: str) -> Verdict:
        ok = verify(response, prompt.gold) == 1.0
        return Verdict(format_reward(response, prompt.gold, self.format_coef),
                       {"correct": ok, "well_formed": well_formed(response)})
