"""Multi-turn rollout: the policy and an environment take turns inside one trajectory (lesson 08).

    for turn < max_turns:  y_t ~ π_old(·|context)  (until EOS `#` or the per-turn budget)
                           context += y_t           (mask 1, old_logp = the sampling log-probs)
                           obs, r_t, done = env.step(decode(y_t), state);  R += r_t
                           context += encode(obs)   (mask 0, old_logp 0: the policy did not sample it)

The trajectory's response is everything after the prompt, tool output included, so the reference,
collate and the loss see one flat sequence and only `response_mask` tells the two apart: tool
tokens never carry advantage, ratio or KL (lesson 08). The mask is written
here, at sampling time, because only the rollout knows which tokens it sampled (trap 2).

The context of the next turn is the exact list of token ids recorded so far, never re-tokenized
text (trap 4: harmless with a char tokenizer, a real bug with BPE). A trajectory that runs out of
per-turn tokens, total tokens (`sampling.max_tokens`, tool tokens included), context or turns
without a final answer gets reward 0 and still valid masks (trap 5); `finish_reason` says which.

Each turn decodes all K×B still-running contexts in one batch. Same `generate(env, K)` interface and
group filter as `Rollout`; `rlpt.train` picks this engine when the env says `multi_turn`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from rlpt.framework.environment import Prompt, Verdict
from rlpt.framework.rollout import Rollout
from rlpt.framework.trajectory import Trajectory
from rlpt.gpt_mini.generate import SamplingParams, stop_ids


class MultiTurnEnv(Protocol):
    """An environment that answers each assistant turn. `multi_turn = True` marks it for `rlpt.train`."""
    multi_turn: bool
    tokenizer: Any

    def reset(self, split: str = "train") -> Prompt: ...

    def start(self, prompt: Prompt) -> dict: ...       # per-trajectory state handed back to step()

    def step(self, assistant_text: str, state: dict) -> tuple[str, float, bool, dict]: ...   # obs, r, done, info


@dataclass
class Episode:
    """One trajectory under construction."""
    prompt: Prompt
    state: dict
    group: int
    response: list[int] = field(default_factory=list)
    mask: list[float] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    tool_tokens: int = 0
    finish_reason: str | None = None      # None while running; "stop" | "length" | "max_turns" | "error"
    info: dict = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.finish_reason is None

    def extend(self, ids: list[int], logps: list[float] | None) -> None:
        """Append sampled tokens (logps given: mask 1) or injected ones (None: mask 0, old_logp 0)."""
        self.response += ids
        self.mask += [1.0 if logps is not None else 0.0] * len(ids)
        self.logp += logps if logps is not None else [0.0] * len(ids)
        if logps is None:
            self.tool_tokens += len(ids)

    def stop(self, reason: str) -> None:
        self.finish_reason = reason
        if reason != "stop":      # no final answer within the budget: reward 0 (lesson 08)
            self.reward = 0.0
            self.info["correct"] = False


def safe_step(env, text: str, state: dict) -> tuple[str, float, bool, dict]:
    """env.step that cannot kill the batch: an exception ends the trajectory with reward 0, recorded."""
    try:
        obs, r, done, info = env.step(text, state)
        return str(obs), float(r), bool(done), dict(info or {})
    except Exception as e:   # noqa: BLE001
        return "", 0.0, True, {"verify_error": f"{type(e).__name__}: {e}", "correct": False}


class MultiTurnRollout(Rollout):
    def __init__(self, model, tokenizer, prompts_per_step: int, sampling: SamplingParams, seed: int = 0,
                 batch_limit: int = 512, group_filter=None, max_turns: int = 4, turn_tokens: int = 0,
                 backend: str = "engine"):
        super().__init__(model, tokenizer, prompts_per_step, sampling, seed, batch_limit, group_filter, backend)
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.max_turns = max_turns
        self.turn_tokens = turn_tokens or sampling.max_tokens     # per assistant turn; 0 = the total budget

    # -- the loop -----------------------------------------------------------------------------------------
    def run_episodes(self, env, episodes: list[Episode], sp: SamplingParams, generator=None, model=None) -> None:
        """Alternate policy and env turns for all episodes, one batched decode per turn."""
        max_len = getattr(getattr(model or self.model, "cfg", None), "max_seq_len", 1 << 30)
        for _ in range(self.max_turns):
            live = []
            for e in (e for e in episodes if e.running):
                budget = min(self.turn_tokens, sp.max_tokens - len(e.response),
                             max_len - len(e.prompt.ids) - len(e.response))
                if budget <= 0:
                    e.stop("length")
                else:
                    live.append((e, budget))
            if not live:
                break
            t0 = time.perf_counter()
            contexts = [list(e.prompt.ids) + e.response for e, _ in live]    # the recorded ids, never re-encoded
            turn_sp = replace(sp, max_tokens=max(b for _, b in live))
            samples = self._sample(contexts, turn_sp, generator, model)
            t1 = time.perf_counter()
            for (e, budget), s in zip(live, samples):
                toks, logps = s.tokens[:budget], s.logps[:budget]           # rows with less budget cut here
                e.extend(toks, logps)
                e.turns += 1
                if not toks or toks[-1] not in stop_ids(self.tokenizer):
                    e.stop("length")                                       # turn cut before its `#`
                    continue
                obs, r, done, info = safe_step(env, self.tokenizer.decode(toks), e.state)
                e.reward += r
                e.info |= info
                if done:
                    e.stop("error" if "verify_error" in info else "stop")
                    continue
                try:
                    e.extend(self.tokenizer.encode(obs), None)
                except ValueError as err:                                   # an obs the tokenizer cannot encode
                    e.info["verify_error"] = f"tool output: {err}"
                    e.stop("error")
            self.stats["time/generate"] = self.stats.get("time/generate", 0.0) + t1 - t0
            self.stats["time/verify"] = self.stats.get("time/verify", 0.0) + time.perf_counter() - t1
        for e in episodes:
            if e.running:
                e.stop("max_turns")

    def _start(self, env, prompt: Prompt, group: int) -> Episode:
        state = env.start(prompt)
        return Episode(prompt, state, group)

    def _draw(self, env, K: int, n: int, first: int) -> list[list[Trajectory]]:
        prompts = [env.reset("train") for _ in range(n)]
        eps = [self._start(env, p, first + b) for b, p in enumerate(prompts) for _ in range(K)]
        self.run_episodes(env, eps, self.sampling, self.generator)
        self.stats |= tool_stats(eps)
        trajs = [self._to_trajectory(e) for e in eps]
        return [trajs[b * K:(b + 1) * K] for b in range(n)]

    def _to_trajectory(self, e: Episode) -> Trajectory:
        return Trajectory(prompt_ids=list(e.prompt.ids), response_ids=list(e.response),
                          response_mask=torch.tensor(e.mask, dtype=torch.float32),
                          old_logp=torch.tensor(e.logp, dtype=torch.float32), reward=float(e.reward),
                          group=e.group, version=self.version, finish_reason=e.finish_reason,
                          info={"correct": e.reward > 0, **e.info, "turns": e.turns, "tool_tokens": e.tool_tokens,
                                "text": self.tokenizer.decode(e.response), "prompt": e.prompt.text})

    @torch.no_grad()
    def answer(self, env, prompts: list[Prompt], sp: SamplingParams, generator=None) -> list[Verdict]:
        """One multi-turn episode per prompt, as verdicts: reward, the env's info, and `len` (response tokens,
        tool output included), `turns`, and the tool's `tool_calls` / `tool_errors` where the env counts them."""
        eps = [self._start(env, p, i) for i, p in enumerate(prompts)]
        self.run_episodes(env, eps, sp, generator)
        return [Verdict(e.reward, {**e.info, "len": len(e.response), "turns": e.turns,
                                   **{k: e.state[k] for k in ("tool_calls", "tool_errors") if k in e.state}})
                for e in eps]


def tool_stats(eps: list[Episode]) -> dict:
    """Tool calls and errors per episode (`tool/calls_mean`, `tool/errors_mean`), where the env counts them."""
    if not eps or not all("tool_calls" in e.state for e in eps):
        return {}
    n = len(eps)
    return {"tool/calls_mean": sum(e.state["tool_calls"] for e in eps) / n,
            "tool/errors_mean": sum(e.state.get("tool_errors", 0) for e in eps) / n}
