"""LLM-as-judge: a local rlpt model compares the response with a reference answer by log-likelihood.

    shown   prompt  first , second                    (order drawn at random per call)
    s(x)  = mean_t log π_judge(x_t | shown context before x_t)
    reward = 1 if s(response) >= s(reference) - margin else 0

The answer shown second is read after the first, so the judge can favour a position: order is
randomised per verdict (lesson 18, the open-ended archetype), and every verdict is also taken in the
swapped order (same batch, one forward) to measure `position_agreement`: the fraction of verdicts
that do not depend on the order. A judge near 0.5 there is reading positions, not answers.

The judge is any model with `model(ids) -> logits` over the char tokenizer, e.g. an SFT checkpoint
(`JudgeEnv(judge_path=...)`); it is a leaky proxy (lesson 18): cheap, and hackable by whatever the
judge happens to like.
"""
from __future__ import annotations

import random

import torch

from rlpt.framework.environment import ArithmeticEnv, Prompt, Verdict, register_env
from rlpt.framework.trajectory import pad_sequences, per_token_logp, response_slice

SEP = ","


class LogLikelihoodJudge:
    def __init__(self, model, tokenizer, margin: float = 0.5):
        self.model, self.tok, self.margin = model, tokenizer, margin

    @torch.no_grad()
    def pair_scores(self, prompt_ids: list[int], first: list[int], second: list[int]) -> tuple[float, float]:
        s = self.batch_scores([(prompt_ids, first, second)])
        return s[0]

    @torch.no_grad()
    def batch_scores(self, rows: list[tuple[list[int], list[int], list[int]]]) -> list[tuple[float, float]]:
        """Mean log-prob of `first` after the prompt and of `second` after prompt + first + SEP, per row."""
        sep = self.tok.encode(SEP)
        ids, _ = pad_sequences([p for p, _, _ in rows], [a + sep + b for _, a, b in rows], self.tok.pad_id)
        was = getattr(self.model, "training", False)
        if hasattr(self.model, "eval"):
            self.model.eval()
        logp = per_token_logp(self.model, ids)               # (B, T-1): column j scores token j+1
        if was:
            self.model.train()
        out = []
        for i, (p, a, b) in enumerate(rows):
            s_a = logp[i, response_slice(len(p), len(a))].mean()
            s_b = logp[i, response_slice(len(p) + len(a) + len(sep), len(b))].mean()
            out.append((float(s_a), float(s_b)))
        return out


@register_env("judge")
class JudgeEnv(ArithmeticEnv):
    """Arithmetic prompts judged against the reference answer `{gold}#` by a local model."""
    model_path_arg = "judge_path"     # rlpt.train passes env.model_path here

    def __init__(self, task=None, seed: int = 0, tokenizer=None, judge_model=None, judge_path: str | None = None,
                 margin: float = 0.5):
        super().__init__(task, seed, tokenizer)
        if judge_model is None:
            if judge_path is None:
                raise ValueError("env 'judge' needs a judge model: set env.model_path=<an SFT checkpoint> "
                                 "(or JudgeEnv(judge_model=...) / judge_path= in code)")
            from rlpt.gpt_mini.model import load_model
            judge_model = load_model(judge_path)
        self.judge = LogLikelihoodJudge(judge_model, self.tokenizer, margin)
        self.order_rng = random.Random(seed + 1)
        self.verdicts = 0
        self.agreements = 0

    @property
    def position_agreement(self) -> float:
        return self.agreements / self.verdicts if self.verdicts else float("nan")

    def verify(self, prompt: Prompt, response: str) -> Verdict:
        try:
            resp = self.tokenizer.encode(response)
        except ValueError:
            return Verdict(0.0, {"correct": False, "judge_error": "response outside the judge's alphabet"})
        if not resp:
            return Verdict(0.0, {"correct": False})
        ref = self.tokenizer.encode(f"{prompt.gold}#")
        (r1, g1), (g2, r2) = self.judge.batch_scores([(prompt.ids, resp, ref), (prompt.ids, ref, resp)])
        win_first = r1 >= g1 - self.judge.margin           # response shown first
        win_second = r2 >= g2 - self.judge.margin          # response shown second
        response_first = self.order_rng.random() < 0.5
        win = win_first if response_first else win_second
        self.verdicts += 1
        self.agreements += win_first == win_second
        return Verdict(float(win), {"correct": bool(win), "judge_order": "response_first" if response_first else
                                    "reference_first", "position_agree": win_first == win_second,
                                    "position_agreement": self.position_agreement})
