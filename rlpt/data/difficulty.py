"""Difficulty as the policy's pass rate (lesson 18a, stage 5): K samples per prompt through the engine, scored
by the env's verifier.

    p̂ = (1/K) Σ_i verify(x, y_i),  y_i ~ π(·|x) at temperature T       one engine request per prompt, n = K
    Wilson 95 %:  (p̂ + z²/2K ± z √(p̂(1-p̂)/K + z²/4K²)) / (1 + z²/K),   z = 1.96
    bucket:  too_hard  p̂ < 0.05  |  train  0.05 ≤ p̂ ≤ 0.95  |  too_easy  p̂ > 0.95

The course's buckets are [0, .05] / [.05, .95] / [.95, 1]; the edges here belong to the training pool. At K = 8
p̂ moves in steps of 1/8, so the buckets are p̂ = 0, 1/8..7/8, 1. p̂ is coarse and policy-relative: at K = 8 a
prompt with p = 0.1 fails all 8 samples with probability 0.43, which is why "too hard" means hold for later
(its Wilson interval says how little one zero proves), and why the band filter keeps 0 < p̂ < 1 by default
(Skywork-OR1's `1 <= model_difficulty <= 15` of 16) rather than open-r1's 0.1 / 0.9.

One request with n = K prefills the prompt once and forks its KV blocks for the K samples (the engine's
`tokens/shared_by_fork`); each request has its own seed, so a prompt's samples do not depend on the batch.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from rlpt.data.prompts import PromptRow
from rlpt.engine.sampling import SamplingParams
from rlpt.framework.environment import Prompt, safe_verify

Z95 = 1.959963984540054          # the standard normal's 97.5 % quantile
TOO_HARD, TOO_EASY = 0.05, 0.95  # the course's bucket edges


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (Wilson 1927); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bucket(p_hat: float) -> str:
    """'too_hard' (p̂ < 0.05), 'train' (0.05 <= p̂ <= 0.95) or 'too_easy' (p̂ > 0.95)."""
    return "too_hard" if p_hat < TOO_HARD else "too_easy" if p_hat > TOO_EASY else "train"


@dataclass(frozen=True)
class PassRate:
    id: str
    successes: int
    k: int
    low: float          # Wilson 95 %
    high: float

    @property
    def p_hat(self) -> float:
        return self.successes / self.k

    @property
    def bucket(self) -> str:
        return bucket(self.p_hat)

    def as_dict(self) -> dict:
        return {"id": self.id, "successes": self.successes, "k": self.k, "p_hat": self.p_hat,
                "wilson_low": self.low, "wilson_high": self.high, "bucket": self.bucket}


def pass_rates(llm, env, rows: list[PromptRow], k: int = 8, temperature: float = 1.0, max_tokens: int = 24,
               seed: int = 0, gold: Callable[[str], object] = str) -> list[PassRate]:
    """p̂ for every row: one request of n = k samples per prompt through `llm` (an rlpt.engine.LLM), each
    response decoded with its EOS and scored by `env.verify` against `gold(row.answer)`."""
    tok = llm.tokenizer
    params = [SamplingParams(n=k, temperature=temperature, max_tokens=max_tokens,
                             seed=(seed * 1_000_003 + i) % (2 ** 62)) for i in range(len(rows))]
    outs = llm.generate([r.prompt for r in rows], params)
    rates = []
    for r, out in zip(rows, outs):
        prompt = Prompt(r.prompt, [], gold(r.answer), dict(r.metadata))
        wins = sum(safe_verify(env, prompt, tok.decode(c.token_ids)).reward == 1.0 for c in out.outputs)
        rates.append(PassRate(r.id, wins, k, *wilson(wins, k)))
    return rates


def in_band(p_hat: float, low: float = 0.0, high: float = 1.0) -> bool:
    """The band filter: low < p̂ < high (both open: the default keeps every non-degenerate prompt)."""
    return low < p_hat < high
