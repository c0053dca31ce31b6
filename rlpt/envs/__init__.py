"""Verifiers behind the environment protocol (lesson 18); importing this package registers them.

    calculator  multi-turn arithmetic with a `c(...)` tool          rlpt.envs.calculator
    math        answers checked with math-verify (3/4 = 0.75)         rlpt.envs.math_answer
    code        programs run in a sandbox against hidden tests        rlpt.envs.code_sandbox
    judge       an rlpt model as LLM-as-judge, order randomised       rlpt.envs.judge
    leaky       a deliberately hackable verifier (reward-hacking demo) rlpt.envs.leaky
    prm         the verifier plus a process reward model's step scores  rlpt.envs.prm
    curriculum  arithmetic prompts drawn by an online curriculum         rlpt.envs.curriculum
    format      accuracy plus R1-Zero's format reward (a chain of thought)  rlpt.envs.format_reward
"""
from rlpt.envs import calculator, code_sandbox, curriculum, format_reward, judge, leaky, math_answer, prm  # noqa: F401
