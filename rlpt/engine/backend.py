"""The RL rollout backend: `rlpt.gpt_mini.generate.generate`'s contract, served by the paged engine.

    backend = EngineBackend(max_num_seqs=256)      # one per rollout; it keeps one engine per model object
    samples = backend(model, prompts, SamplingParams(max_tokens, temperature, top_p, top_k), eos_id, pad_id, generator)
    samples[i].tokens / .logps / .finish_reason          # one Sample per prompt, in order

`model` is a gpt_mini GPT or a HF Llama / Qwen2 / Mistral (bare, an rlpt HFPolicy, or under a peft adapter),
read in place (rlpt/engine/weights.py).

Drop-in for `rlpt.framework.rollout`: identical prompts in one call (the K samples of a GRPO group)
become one request with n = K, so the prompt is prefilled once and its blocks are shared. Seeds come
from `generator` (one draw per distinct prompt, then one key per sample: `Sequence.seed`), so a run is reproducible
from the generator's state; with `generator=None` they come from torch's global RNG, like
`torch.multinomial` in the simple sampler. One engine (KV pool, prefix cache) is kept per model
object; a weight change (a trainer step, `WeightSyncer.copy_weights`) is detected from the
parameters' version counters and drops the stale prefix cache. Differences from the simple sampler:
each prompt may generate up to `max_seq_len - len(prompt)` tokens (not `- len(longest prompt)`),
and `pad_id` is unused (nothing is padded).
"""
from __future__ import annotations

import weakref

import torch

from rlpt.engine.llm import LLM
from rlpt.engine.sampling import SamplingParams
from rlpt.engine.weights import why_not_served
from rlpt.gpt_mini.generate import Sample

SEED_BOUND = 2 ** 62             # the seed range; child seeds seed + j stay inside int64


def plan_requests(prompts: list[list[int]], temperature: float, generator: torch.Generator | None = None):
    """(distinct prompts in first-seen order, the indices of each one's copies, one seed each or None if greedy):
    identical prompts become one request with n = their count, one seed drawn per request from `generator`
    (EngineBackend and the vLLM backend both plan with this, so either leaves the generator in the same state)."""
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"every prompt needs at least one token; prompts {empty[:4]} are empty")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(int(t) for t in p), []).append(i)
    keys = list(groups)
    seeds = torch.randint(0, SEED_BOUND, (len(keys),), generator=generator).tolist() if temperature > 0 \
        else [None] * len(keys)             # greedy draws nothing, like the engine and the simple sampler
    return keys, [groups[k] for k in keys], seeds


class EngineBackend:
    def __init__(self, **llm_kwargs):
        self.llm_kwargs = llm_kwargs
        self._engines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def engine(self, model) -> LLM:
        llm = self._engines.get(model)
        if llm is None:
            why = why_not_served(model)
            if why is not None:
                raise ValueError(f"rollout.backend='engine' cannot serve {type(model).__name__}: {why}; sample it "
                                 f"with rollout.backend=simple (Rollout(..., backend='simple'))")
            llm = self._engines[model] = LLM(model, **self.llm_kwargs)
        return llm

    def reset_prefix_caches(self) -> None:
        """Forget every cached prefix (their blocks return to the pool); the engines stay."""
        for llm in list(self._engines.values()):
            llm.reset_prefix_cache()

    def __call__(self, model, prompts: list[list[int]], sp, eos_id: int, pad_id: int,
                 generator: torch.Generator | None = None, on_sample=None) -> list[Sample]:
        """`on_sample(i, sample)`, if given, gets each prompt's Sample the step it finishes (LLM.generate's
        on_finish); the samples returned are the same."""
        keys, copies, seeds = plan_requests(prompts, sp.temperature, generator)
        groups = dict(zip(keys, copies))
        seeds = [0 if s is None else s for s in seeds]
        params = [SamplingParams(n=len(groups[k]), temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                                 max_tokens=sp.max_tokens, seed=s) for k, s in zip(keys, seeds)]
        llm = self.engine(model)
        llm.eos_id = eos_id
        finished = None if on_sample is None else \
            (lambda r, j, c: on_sample(groups[keys[r]][j], Sample(list(c.token_ids), list(c.token_logprobs),
                                                                  c.finish_reason)))
        outs = llm.generate([list(k) for k in keys], params, on_finish=finished)
        samples: list[Sample | None] = [None] * len(prompts)
        for k, out in zip(keys, outs):
            for i, c in zip(groups[k], out.outputs):
                samples[i] = Sample(list(c.token_ids), list(c.token_logprobs), c.finish_reason)
        return samples

