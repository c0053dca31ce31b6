"""The one evaluator: how well a model answers an environment's held-out prompts.

    acc         greedy (T = 0) answers whose env reward is > 0
    acc_honest  the same by the env's info["correct"] (differs from acc only under a hackable verifier)
    pass@k      prompts where any of k samples at temperature T scores; acc_sampled: the mean over those samples
    len         mean response tokens of the greedy answers; multi-turn envs add turns, tool_calls, tool_errors

Every job scores with this function (SFT, DPO, RL's periodic eval, `rlpt eval`, the pipeline), so
their numbers compare. It samples through the rollout role: the inference engine where it can serve
the model (gpt_mini), the padded sampler otherwise (an HF policy), and an env that answers turns
(`multi_turn`, the calculator) through the agent loop. Samples come from a generator of their own, seeded
by `seed`: an evaluation never moves the training RNG, and the same seed scores the same draws again.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from rlpt.framework.agent_loop import MultiTurnRollout
from rlpt.framework.environment import Prompt
from rlpt.framework.rollout import Rollout, backend_for
from rlpt.gpt_mini.generate import SamplingParams


@torch.no_grad()
def evaluate(model, env, prompts: list[Prompt], max_tokens: int, *, k: int = 0, temperature: float = 1.0,
             seed: int = 0, backend: str | None = None, max_turns: int = 4, turn_tokens: int = 0) -> dict:
    """Greedy accuracy of `model` on `prompts` (and, with k > 0, pass@k and acc_sampled); see the module doc."""
    if not prompts:
        raise ValueError("evaluate() got no prompts: raise eval.size")
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    backend = backend or backend_for(model)
    if env.multi_turn:
        rollout = MultiTurnRollout(model, env.tokenizer, 1, greedy, max_turns=max_turns, turn_tokens=turn_tokens,
                                   backend=backend)
    else:
        rollout = Rollout(model, env.tokenizer, 1, greedy, backend=backend)
    verdicts = rollout.answer(env, prompts, greedy)
    n = len(prompts)
    out = {"acc": sum(v.reward > 0 for v in verdicts) / n, "len": sum(v.info["len"] for v in verdicts) / n}
    for key in ("correct", "turns", "tool_calls", "tool_errors"):    # where the env / agent loop reports them
        if all(key in v.info for v in verdicts):
            out["acc_honest" if key == "correct" else key] = sum(float(v.info[key]) for v in verdicts) / n
    if k > 0:
        g = torch.Generator().manual_seed(seed)
        sampled = rollout.answer(env, [p for p in prompts for _ in range(k)], replace(greedy, temperature=temperature),
                                 generator=g)
        hits = [v.reward > 0 for v in sampled]
        out[f"pass@{k}"] = sum(any(hits[i * k:(i + 1) * k]) for i in range(n)) / n
        out["acc_sampled"] = sum(hits) / len(hits)
    return out
