"""Rollout: sample K responses for each of B prompts, record π_old, attach the verifier's reward.

    for each prompt x_b:  y_bk ~ π_old(·|x_b),  old_logp_bk,t = log π_old(y_bk,t | x_b, y_bk,<t),
                          r_bk = verify(x_b, y_bk)

`old_logp` is recorded at sampling time from the very distribution sampled from (temperature,
top-k, top-p applied) and is never recomputed after an optimizer step: recomputing it makes the
PPO ratio ≡ 1 and silently turns the clipped surrogate into plain REINFORCE (lesson 02).
The EOS `#` is the policy's decision to stop, so it is trained (mask 1); nothing after it is.
A response cut by `max_tokens` keeps mask 1 on what was sampled and is marked
`finish_reason = "length"`; it still gets the verifier's verdict.

The model here is the rollout's own copy, updated only by `WeightSyncer`; `version` is the
version of the weights it holds and is stamped on every trajectory.

Dynamic sampling (DAPO's second fix, lesson 13) is a `GroupFilter` an algorithm may declare: the
rollout then draws ⌈need · oversample⌉ fresh prompts per round, keeps the groups that pass, and
repeats until `prompts_per_step` groups passed (surplus dropped) or `max_draws` rounds were made.
At the cap it returns what passed, fewer groups than asked; if none passed, the last round as
drawn, which the algorithm marks degenerate so the step is skipped. It never loops forever.
`stats` reports `sampling/draws`, `sampling/groups_drawn`, `sampling/groups_kept`,
`sampling/filtered_frac` (the measured degenerate fraction) and `sampling/cap_hit`. `drawn` holds every
group the step sampled, the dropped ones too: the controller hands those to `env.observe`, so a curriculum
learns from the groups the filter hid (else a solved prompt's p̂ would never move).

Two sampling backends behind `_sample`, chosen by `rollout.backend`: "engine", the default (`rlpt.engine`:
paged KV, continuous batching over every prompt at once, the K samples of a group as one request with
n = K so the prompt is prefilled once; draws are counter-based from per-prompt seeds taken from
`self.generator`) and "simple" (`rlpt.gpt_mini.generate`: padded batches of `batch_limit`, a dense KV
cache per call, draws from `torch.multinomial`; it drives any model with the incremental interface,
HF policies included: `backend_for(model)` picks it where the engine cannot serve the model).
Both record old_logp the same way (`processed_logp` of the sampled token) and are reproducible from
the generator's state, so a checkpoint holds the same state either way; they draw different tokens at
temperature > 0 and the same at temperature 0. The engine backend serves gpt_mini and Hugging Face
Llama / Qwen2 / Mistral policies in place (rlpt/engine/weights.py reads the trainer's own parameters; LoRA
deltas merged) and sees weight sync through the parameters'
version counters (in-place `copy_` bumps them: its fused weights are rebuilt, its prefix cache
dropped). Its prefix cache is also dropped at the start of every `generate`, so what a step samples
depends only on (weights, prompts, generator state) — the bit-identical resume contract — while the
turns of one multi-turn step still reuse each other's K/V.

A third, "vllm" (rlpt/engine/vllm_backend.py), keeps the engine's contract on a real vLLM (an optional extra for
CUDA machines: processed log-probs, the same seeds from `self.generator`, weights reloaded in place on a change).

Verification runs inline after sampling by default (`rollout.verify_workers=0`: the rollout side of a step is
τ_R + τ_V). `use_verifier(W, timeout)` with W > 0 hands each sequence to a pool of W verifier processes the step
the engine finishes it (rlpt/framework/dispatch.py, lesson 28), so verification overlaps the decoding of the
rest: τ_R + τ_V becomes ≈ max(τ_R, τ_V / W) plus the verifies of the last sequences to finish. Rewards are the
same (each verdict is keyed to its sample); `time/verify` is then only the wait for verdicts after sampling ended,
and `verify/*` counts timeouts (reward 0), worker restarts and worker-seconds, with `verify/t0|t1` (seconds from
the rollout's start) for the timeline's verify lane. Single-turn envs only: the agent loop verifies turn by turn.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlpt.engine.backend import EngineBackend
from rlpt.engine.llm import serves
from rlpt.engine.vllm_backend import VLLMBackend
from rlpt.framework.dispatch import VerifierPool
from rlpt.framework.environment import Prompt, Verdict, safe_verify
from rlpt.framework.trajectory import Trajectory
from rlpt.gpt_mini.generate import SamplingParams, generate, stop_ids

BACKENDS = ("engine", "simple", "vllm")


def backend_for(model) -> str:
    """The default backend where the engine can serve `model` (a gpt_mini GPT); the simple sampler otherwise
    (an HF policy, a test double): for library code that samples from whatever model it is handed."""
    return "engine" if serves(model) else "simple"


@dataclass
class GroupFilter:
    """Which groups are worth training on, and how hard to look for them (see module doc)."""
    keep: Callable[[list[Trajectory]], bool]
    max_draws: int = 4          # sampling rounds per step at most: the retry cap
    oversample: float = 1.0     # prompts drawn per round = ⌈still needed · oversample⌉

    def __post_init__(self):
        if self.max_draws < 1 or self.oversample < 1.0:
            raise ValueError(f"GroupFilter needs max_draws >= 1 and oversample >= 1, "
                             f"got {self.max_draws} and {self.oversample}")


class Rollout:
    def __init__(self, model, tokenizer, prompts_per_step: int, sampling: SamplingParams, seed: int = 0,
                 batch_limit: int = 512, group_filter: GroupFilter | None = None, backend: str = "engine"):
        self.model = model
        self.tokenizer = tokenizer
        self.prompts_per_step = prompts_per_step
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_limit = batch_limit      # most sequences decoded together
        self.version = 0
        self.group_filter = group_filter
        self.stats: dict = {}
        self.drawn: list[list[Trajectory]] = []     # every group the last `generate` sampled (filtered ones too)
        self.use_backend(backend)
        self.verify_workers, self.verify_timeout, self._pool, self._pool_env = 0, 30.0, None, None
        self._t_start: float | None = None

    def use_backend(self, backend: str) -> None:
        """Pick the sampler (see module doc); subclasses need not forward a constructor argument."""
        if backend not in BACKENDS:
            raise ValueError(f"rollout.backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        # one paged engine per model object (the rollout copy; evaluate may pass the trainer's)
        self._engine = EngineBackend(max_num_seqs=min(self.batch_limit, 256)) if backend == "engine" else \
            VLLMBackend() if backend == "vllm" else None    # vllm: imported here, a clear error if missing

    def use_verifier(self, workers: int, timeout: float = 30.0) -> None:
        """Verify inline (workers = 0) or in a pool of `workers` processes overlapped with sampling (see module
        doc); the pool starts at the first `generate` (on the env it is given) and stops with `close`."""
        if workers < 0 or not timeout > 0:
            raise ValueError(f"rollout.verify_workers must be >= 0 and rollout.verify_timeout > 0, got {workers} "
                             f"and {timeout}")
        if workers and type(self)._draw is not Rollout._draw:
            raise ValueError(f"rollout.verify_workers={workers}: {type(self).__name__} verifies turn by turn inside "
                             "its own loop (a multi-turn env); use rollout.verify_workers=0")
        self.close()
        self.verify_workers, self.verify_timeout = workers, float(timeout)

    def close(self) -> None:
        """Stop the verifier pool, if one runs (it also stops when the rollout is garbage collected)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _sample(self, prompts: list[list[int]], sp: SamplingParams, generator=None, model=None, on_sample=None):
        """Samples in prompt order; `on_sample(i, sample)` sees each as it finishes (engine: the step it ends;
        simple: at the end of its padded batch)."""
        if self._engine is not None:            # continuous batching: every prompt in one call
            return self._engine(model or self.model, prompts, sp, stop_ids(self.tokenizer), self.tokenizer.pad_id,
                                generator, on_sample=on_sample)
        out = []
        for i in range(0, len(prompts), self.batch_limit):
            out += generate(model or self.model, prompts[i:i + self.batch_limit], sp, stop_ids(self.tokenizer),
                            self.tokenizer.pad_id, generator)
            for j in range(i, len(out)) if on_sample is not None else ():
                on_sample(j, out[j])
        return out

    def generate(self, env, K: int) -> list[list[Trajectory]]:
        """B = prompts_per_step groups of K trajectories each, rewards attached (filtered: see module doc)."""
        self.stats = {"time/generate": 0.0, "time/verify": 0.0}
        self._t_start = time.perf_counter()      # the verify lane's clock (verify/t0|t1)
        if self._engine is not None:
            self._engine.reset_prefix_caches()
        target, f = self.prompts_per_step, self.group_filter
        if f is None:
            self.drawn = self._draw(env, K, target, first=0)
            return self.drawn
        kept, last, draws, drawn, rewards = [], [], 0, 0, []
        self.drawn = []
        while len(kept) < target and draws < f.max_draws:
            last = self._draw(env, K, math.ceil((target - len(kept)) * f.oversample), first=drawn)
            self.drawn += last
            draws, drawn = draws + 1, drawn + len(last)
            rewards += [t.reward for g in last for t in g]
            kept += [g for g in last if f.keep(g)]
        self.stats |= {"sampling/draws": float(draws), "sampling/groups_drawn": float(drawn),
                       "sampling/groups_kept": float(min(len(kept), target)),
                       "sampling/filtered_frac": 1.0 - len(kept) / drawn,
                       "sampling/cap_hit": float(len(kept) < target),
                       "sampling/reward_mean_drawn": sum(rewards) / len(rewards)}
        return kept[:target] or last

    def _draw(self, env, K: int, n: int, first: int) -> list[list[Trajectory]]:
        """n fresh prompts, K samples each; groups numbered from `first`."""
        prompts = [env.reset("train") for _ in range(n)]
        if self.verify_workers:
            return self._draw_dispatched(env, K, prompts, first)
        t0 = time.perf_counter()
        samples = self._sample([p.ids for p in prompts for _ in range(K)], self.sampling, self.generator)
        t1 = time.perf_counter()
        groups = []
        for b, prompt in enumerate(prompts):
            groups.append([self._trajectory(prompt, samples[b * K + k], env, first + b) for k in range(K)])
        self.stats["time/generate"] += t1 - t0
        self.stats["time/verify"] += time.perf_counter() - t1
        return groups

    def _draw_dispatched(self, env, K: int, prompts: list[Prompt], first: int) -> list[list[Trajectory]]:
        """`_draw` with each sample verified in the pool from the step it finishes; verdicts keyed by the
        sample's index i = b·K + k, so the order they come back in does not matter."""
        if self._pool is not None and self._pool_env is not env:    # the workers hold a copy of another env
            self.close()
        if self._pool is None:
            self._pool, self._pool_env = VerifierPool(env, self.verify_workers, self.verify_timeout), env
            self.stats["verify/pool_start_s"] = self._pool.start_s    # once, inside the first step's rollout
        pool = self._pool
        pool.take_stats()              # nothing of an earlier draw leaks into this one
        t0 = time.perf_counter()
        samples = self._sample([p.ids for p in prompts for _ in range(K)], self.sampling, self.generator,
                               on_sample=lambda i, s: pool.submit(i, prompts[i // K], self.tokenizer.decode(s.tokens)))
        t1 = time.perf_counter()
        verdicts = pool.gather(range(len(samples)))
        t2 = time.perf_counter()
        groups = [[self._trajectory(prompt, samples[b * K + k], env, first + b, verdicts[b * K + k])
                   for k in range(K)] for b, prompt in enumerate(prompts)]
        st, ps = self.stats, pool.take_stats()
        st["time/generate"] += t1 - t0
        st["time/verify"] += t2 - t1               # only the wait after sampling: the rest overlapped it
        for k in ("verify/timeouts", "verify/restarts", "verify/count", "verify/busy"):   # summed over draws
            st[k] = st.get(k, 0.0) + ps[k]
        if st["verify/count"]:
            st["verify/latency_mean"] = st["verify/busy"] / st["verify/count"]
            st["verify/latency_max"] = max(st.get("verify/latency_max", 0.0), ps.get("verify/latency_max", 0.0))
        if ps["t_first"] is not None:                # first hand-out and last verdict, from the rollout's start
            start = t0 if self._t_start is None else self._t_start
            st.setdefault("verify/t0", ps["t_first"] - start)
            st["verify/t1"] = ps["t_last"] - start
        return groups

    def _trajectory(self, prompt: Prompt, s, env, group: int, verdict: Verdict | None = None) -> Trajectory:
        text = self.tokenizer.decode(s.tokens)
        if verdict is None:
            verdict = safe_verify(env, prompt, text)
        R = len(s.tokens)
        return Trajectory(prompt_ids=list(prompt.ids), response_ids=list(s.tokens),
                          response_mask=torch.ones(R), old_logp=torch.tensor(s.logps, dtype=torch.float32),
                          reward=float(verdict.reward), group=group, version=self.version,
                          finish_reason=s.finish_reason, info={"text": text, "prompt": prompt.text, **verdict.info})

    @torch.no_grad()
    def answer(self, env, prompts: list[Prompt], sp: SamplingParams, generator=None) -> list[Verdict]:
        """One response per prompt, verified: the env's verdict with `info["len"]` (response tokens) added.
        What `rlpt.framework.evaluate` scores; the training path is `generate`."""
        samples = self._sample([p.ids for p in prompts], sp, generator)
        return [_with_len(safe_verify(env, p, self.tokenizer.decode(s.tokens)), len(s.tokens))
                for p, s in zip(prompts, samples)]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "version": self.version,
                "model": {k: v.clone() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.version = state["version"]
        self.model.load_state_dict(state["model"])


def _with_len(v: Verdict, n: int) -> Verdict:
    return Verdict(v.reward, {**v.info, "len": n})
