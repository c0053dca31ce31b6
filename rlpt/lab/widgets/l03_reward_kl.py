"""Lesson 03 · the verifier and the KL anchor. (a) rlpt's arithmetic verifier (last integer == gold) and the
deliberately leaky one of the reward-hacking demo, on a response you type. (b) "β trades reward against KL drift"
in closed form: over five candidate answers to <3+4+5>, the KL-regularised optimum of E[r] − β·KL(π‖π_ref) is
π*_β(y) ∝ π_ref(y)·exp(r(y)/β); its reward, and its KL from kl_estimate summed exactly over the five answers.
"""
from __future__ import annotations

import math

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "Verifier, and β trades reward against KL drift"
SOURCE = ["rlpt.gpt_mini.task:verify", "rlpt.envs.leaky:LeakyArithmeticEnv.verify",
          "rlpt.framework.algorithm:kl_estimate"]
NOTES = [("course", "Verifier: 'let me think 3+4=7, 7+5=12, so 12#' → 12, reward 1; try '12#', '11#', '120#'. "
                    "β: small β lets the policy drift far from π_ref for reward; large β anchors it (reward stays "
                    "near π_ref's). Recipes use β ≈ 1e-2 to 1e-1; the course's default is 0.05."),
         ("fix", "The course's β widget cannot reach its own 'reward-hacked' state: its hack bump starts at θ = 5 and "
                 "200 steps of its ascent never pass θ ≈ 2.1 (shared/spec part 1 §5.4). The lab replaces the toy by "
                 "the exact optimum; for hacking as it really happens, see the leaky verifier here and the runs "
                 "dashboard on `tests/data/diagnose/hack`.")]
GOLD = 12
CANDIDATES = ("12#", "let me think 3+4=7, 7+5=12, so 12#", "11#", "120#", "13#")
REF = (0.15, 0.05, 0.35, 0.15, 0.30)           # π_ref: the SFT model, right a fifth of the time


class Knobs(BaseModel):
    response: str = Field("let me think 3+4=7, 7+5=12, so 12#", max_length=200, description="response to <3+4+5>")
    beta: float = Field(0.05, ge=0.005, le=1.0, description="β", json_schema_extra={"step": 0.005})


def _optimum(beta: float) -> tuple[list[float], float, float]:
    import torch

    from rlpt.framework.algorithm import kl_estimate
    from rlpt.gpt_mini.task import verify
    r = torch.tensor([verify(c, GOLD) for c in CANDIDATES])
    ref = torch.tensor(REF).log()
    pi = torch.log_softmax(ref + r / beta, 0)                       # log π*_β
    kl = float((pi.exp() * kl_estimate(pi, ref, "k1")).sum())       # E_π*[log π* − log π_ref], exactly
    return pi.exp().tolist(), float((pi.exp() * r).sum()), kl


def compute(k: Knobs) -> dict:
    from rlpt.envs.leaky import LeakyArithmeticEnv
    from rlpt.framework.environment import Prompt
    from rlpt.gpt_mini.task import last_integer, verify
    leaky = LeakyArithmeticEnv.verify(None, Prompt("<3+4+5>", [], GOLD), k.response)   # verify uses no state
    pi, reward, kl = _optimum(k.beta)
    betas = [math.exp(x / 10) for x in range(-53, 1)]                # 0.005 .. 1, log-spaced
    curves = [_optimum(b) for b in betas]
    return {"answer": last_integer(k.response), "reward": verify(k.response, GOLD), "leaky_reward": leaky.reward,
            "hacked": leaky.info["hacked"], "pi": pi, "exp_reward": reward, "kl": kl,
            "reward_curve": [(b, c[1]) for b, c in zip(betas, curves)],
            "kl_curve": [(b, c[2]) for b, c in zip(betas, curves)]}


def render(r: dict) -> str:
    k = svg.kpis([("extracted answer", str(r["answer"])), ("reward", f'{r["reward"]:.0f}'),
                  ("leaky verifier", f'{r["leaky_reward"]:.0f}' + (" (hacked)" if r["hacked"] else "")),
                  ("E[r] at β", f'{r["exp_reward"]:.3f}'), ("KL(π*‖π_ref)", f'{r["kl"]:.3f}')])
    table = svg.table(["candidate", "π_ref", "π*_β"], [[c, p0, round(p, 4)] for c, p0, p in
                                                        zip(CANDIDATES, REF, r["pi"])])
    return (k + table + svg.line_chart({"E[r]": r["reward_curve"], "KL": r["kl_curve"]}, "β", "",
                                       "reward and KL of π*_β"))
