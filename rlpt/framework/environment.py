"""The environment: where prompts come from and what a response is worth.

    prompt = env.reset(split)                      # a prompt with its gold data
    verdict = env.verify(prompt, response_text)    # reward (float) + info (dict)

The verifier *is* the task (lesson 18): the rollout calls it right after sampling, and the
controller never sees how a reward was computed. `safe_verify` turns a verifier that raises on
one response into reward 0 with the reason recorded, so one bad response cannot kill a batch.

Environments register by name (`@register_env("arithmetic")`) so recipes can name them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from rlpt.gpt_mini.task import ArithmeticTask, Problem, verify
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.run import Stateless


@dataclass
class Prompt:
    text: str
    ids: list[int]
    gold: Any
    meta: dict = field(default_factory=dict)


@dataclass
class Verdict:
    reward: float
    info: dict = field(default_factory=dict)


class Environment(Stateless):
    """The base of every env: what to implement, and the optional parts' neutral defaults.

    Implement `reset`, `verify`, `heldout`. `multi_turn = True` (with `start` and `step`, see
    rlpt.framework.agent_loop.MultiTurnEnv) makes jobs run it through the agent loop; `model_path_arg`
    names the constructor keyword that receives `env.model_path` (an env that scores with a model);
    `state_dict` holds whatever must survive a resume (the prompt sampler's RNG); `observe` sees each step's
    groups after the advantages (an online curriculum updates its pass rates there, rlpt.envs.curriculum).
    """
    tokenizer: Any
    multi_turn: bool = False
    model_path_arg: str | None = None

    def reset(self, split: str = "train") -> Prompt:
        raise NotImplementedError

    def verify(self, prompt: Prompt, response: str) -> Verdict:
        raise NotImplementedError

    def heldout(self, n: int) -> list[Prompt]:
        raise NotImplementedError

    def observe(self, groups: list) -> dict:
        """Called by the controller once per step with the step's groups (lists of K Trajectories, as sampled,
        advantages set); returns metrics to log. The default keeps nothing and logs nothing."""
        return {}

    def start(self, prompt: Prompt) -> dict:
        """Per-trajectory state for a multi-turn episode (handed back to `step`)."""
        return {"gold": prompt.gold}


ENVS: dict[str, type] = {}


def register_env(name: str):
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Environment)):
            raise TypeError(f"@register_env({name!r}): {cls!r} must subclass rlpt.framework.environment.Environment")
        ENVS[name] = cls
        return cls
    return deco


def env_class(name: str) -> type:
    if name not in ENVS:
        import difflib
        close = difflib.get_close_matches(name, ENVS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown env '{name}' (config key env.name).{hint} Registered: {sorted(ENVS)}")
    return ENVS[name]


def make_env(name: str, **kwargs):
    return env_class(name)(**kwargs)


def safe_verify(env, prompt: Prompt, response: str) -> Verdict:
    try:
        v = env.verify(prompt, response)
        return v if isinstance(v, Verdict) else Verdict(float(v))
    except Exception as e:   # noqa: BLE001 - a verifier bug on one response scores 0, counted
        return Verdict(0.0, {"verify_error": f"{type(e).__name__}: {e}"})


@register_env("arithmetic")
class ArithmeticEnv(Environment):
    """`<3+4+5>` → reward 1 iff the response's last integer is 12 (the shared task of lessons 01–03)."""

    def __init__(self, task: ArithmeticTask | None = None, seed: int = 0, tokenizer: CharTokenizer | None = None):
        self.task = task or ArithmeticTask()
        self.tokenizer = tokenizer or CharTokenizer()
        self.rng = random.Random(seed)

    def _prompt(self, p: Problem) -> Prompt:
        return Prompt(p.prompt, self.tokenizer.encode(p.prompt), p.gold, {"operands": p.operands})

    def reset(self, split: str = "train") -> Prompt:
        return self._prompt(self.task.sample(self.rng, split))

    def verify(self, prompt: Prompt, response: str) -> Verdict:
        r = verify(response, prompt.gold)
        return Verdict(r, {"correct": r == 1.0})

    def heldout(self, n: int) -> list[Prompt]:
        return [self._prompt(p) for p in self.task.heldout_set(n)]

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
