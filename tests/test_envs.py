"""Verifier checklist (lesson 18) on every env: trivial exploits score ≈ 0, formats do not flip it."""
from __future__ import annotations

import random

import pytest
import torch

from rlpt.envs.calculator import CalculatorArithmeticEnv
from rlpt.envs.code_sandbox import CodeEnv, CodeProblem, Limits
from rlpt.envs.judge import JudgeEnv
from rlpt.envs.leaky import LeakyArithmeticEnv
from rlpt.envs.math_answer import MathAnswerEnv, extract_answer, verify_math
from rlpt.framework.environment import ENVS, ArithmeticEnv
from rlpt.gpt_mini.task import ArithmeticTask
from rlpt.gpt_mini.tokenizer import ALPHABET, PAD

from conftest import TOK, tiny_gpt

TEXT = ALPHABET.replace(PAD, "")


def random_answers(n=200, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(TEXT) for _ in range(rng.randint(1, 12))) for _ in range(n)]


class OracleJudgeLM(torch.nn.Module):
    """Puts logit 10 on the right answer `{sum}#` after the prompt and after each `,`: a judge that knows."""

    def forward(self, ids):
        B, T = ids.shape
        logits = torch.zeros(B, T, TOK.vocab_size)
        for b in range(B):
            text = TOK.decode(ids[b])
            close = text.index(">")
            target = str(sum(int(x) for x in text[1:close].split("+"))) + "#,"
            start = close
            for j in range(close, T - 1):
                if j > close and text[j] == ",":
                    start = j
                off = j - start
                logits[b, j, TOK.stoi[target[min(off, len(target) - 1)]]] = 10.0
        return logits


def judge_env(model=None):
    return JudgeEnv(ArithmeticTask(max_operands=3), tokenizer=TOK, judge_model=model or OracleJudgeLM())


CODE = [CodeProblem("sum", [("1 2\n", "3"), ("10 -4\n", "6"), ("7 0\n", "7")])]


def checklist_envs():
    task = ArithmeticTask(max_operands=3, max_value=9)
    return {"arithmetic": ArithmeticEnv(task, tokenizer=TOK),
            "calculator": CalculatorArithmeticEnv(task, tokenizer=TOK),
            "math": MathAnswerEnv(tokenizer=TOK), "judge": judge_env()}


@pytest.mark.parametrize("name", ["arithmetic", "calculator", "math", "judge"])
def test_constant_and_random_answers_score_about_zero(name):
    env = checklist_envs()[name]
    prompts = [env.reset() for _ in range(200)]
    const = sum(env.verify(p, "42#").reward for p in prompts) / len(prompts)
    rand = sum(env.verify(p, r).reward for p, r in zip(prompts, random_answers())) / len(prompts)
    assert const <= 0.05 and rand <= 0.05, (const, rand)


def test_code_constant_and_random_programs_score_zero():
    env = CodeEnv(CODE, limits=Limits(cpu_s=1, wall_s=2.0))
    p = env.reset()
    assert env.verify(p, "print(42)").reward == 0.0
    assert all(env.verify(p, r).reward == 0.0 for r in random_answers(5))
    assert env.verify(p, "a, b = map(int, input().split())\nprint(a + b)\n").reward == 1.0


def test_leaky_verifier_fails_the_checklist():
    env = LeakyArithmeticEnv(ArithmeticTask(max_operands=3), tokenizer=TOK)
    prompts = [env.reset() for _ in range(100)]
    soup = sum(env.verify(p, "0123456789 1011121314151617181920212223242526#").reward for p in prompts) / 100
    assert soup == 1.0                              # the hack: digit soup always pays
    assert not env.verify(prompts[0], "0123456789 1011121314151617181920212223242526#").info["correct"]


# -- math-verify: equivalent forms score 1, near misses 0 ------------------------------------------------
@pytest.mark.parametrize("response,gold", [
    ("3/4", "3/4"), ("0.75", "3/4"), (".75", "3/4"), ("6/8", "3/4"), ("0.750\n\n", "3/4"), ("3/4#", "3/4"),
    ("\\frac{3}{4}", "3/4"), ("\\dfrac{3}{4}", "3/4"), ("\\boxed{\\frac34}", "3/4"),
    ("The answer is $\\frac{3}{4}$.", "3/4"),
    ("THE ANSWER IS 0.75", "3/4"), ("the answer is 0.75", "3/4"), ("2.0", "2"), ("\\sqrt{4}", "2"),
    ("\\frac{1}{2} + 1", "3/2"), ("first 1/2, then 5/6", "5/6"), ("3+4=7,7+5=12#", "12"),
])
def test_equivalent_forms_score_one(response, gold):
    assert verify_math(response, gold)[0] == 1.0


@pytest.mark.parametrize("response,gold", [
    ("0.7", "3/4"), ("1 2", "12"), ("1/2, 3/4, 5/6", "1/2"), ("4/3", "3/4"), ("", "1"), ("no idea", "1"),
    ("1.3333", "4/3"),
])
def test_near_misses_score_zero(response, gold):
    assert verify_math(response, gold)[0] == 0.0


def test_math_env_prompts_fit_the_char_tokenizer():
    env = MathAnswerEnv(tokenizer=TOK)
    p = env.reset()
    assert p.ids and TOK.decode(p.ids) == p.text and "/" in p.text
    assert env.verify(p, str(p.gold)).reward == 1.0
    assert extract_answer("\\boxed{1/2} and then 7") == "1/2"


# -- judge ---------------------------------------------------------------------------------------------------
def test_oracle_judge_accepts_right_answers_in_either_order():
    env = judge_env()
    prompts = [env.reset() for _ in range(30)]
    assert all(env.verify(p, f"{p.gold}#").reward == 1.0 for p in prompts)
    orders = {env.verify(p, f"{p.gold}#").info["judge_order"] for p in prompts}
    assert orders == {"response_first", "reference_first"}          # order is randomised
    assert env.position_agreement == 1.0


class SecondPlaceJudgeLM(torch.nn.Module):
    """Predicts every token after the first `,` exactly (logit 10 on it) and is uniform before: whatever is
    shown second scores ≈ 0 nats a token, what is shown first log(1/V). A judge that reads positions."""

    def forward(self, ids):
        B, T = ids.shape
        logits = torch.zeros(B, T, TOK.vocab_size)
        for b in range(B):
            sep = TOK.decode(ids[b]).index(",")
            logits[b, torch.arange(sep, T - 1), ids[b, sep + 1:]] = 10.0
        return logits


def test_a_judge_that_reads_positions_has_position_agreement_zero():
    env = judge_env(SecondPlaceJudgeLM())
    answers = [a for a in random_answers(40) if "," not in a]       # one `,` per row: the separator
    vs = [env.verify(env.reset(), r) for r in answers]
    assert env.position_agreement == 0.0 and not any(v.info["position_agree"] for v in vs)
    # the answer shown second wins: reward 1 exactly when the reference came first
    assert [v.reward for v in vs] == [float(v.info["judge_order"] == "reference_first") for v in vs]
    assert {v.info["judge_order"] for v in vs} == {"response_first", "reference_first"}


def test_judge_with_an_untrained_model_counts_its_position_agreement():
    env = judge_env(tiny_gpt(n_layer=1, d_model=16, d_ff=32))
    vs = [env.verify(env.reset(), r) for r in random_answers(40)]
    assert all(v.reward in (0.0, 1.0) for v in vs)
    agree = [v.info["position_agree"] for v in vs]
    assert env.position_agreement == sum(agree) / 40 == vs[-1].info["position_agreement"]


def test_judge_needs_a_model():
    with pytest.raises(ValueError, match="judge model"):
        JudgeEnv(tokenizer=TOK)


def test_all_envs_registered():
    assert {"arithmetic", "calculator", "math", "code", "judge", "leaky"} <= set(ENVS)
