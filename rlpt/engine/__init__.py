"""rlpt.engine: a paged-KV inference engine with a vLLM-shaped API, in plain PyTorch.

    from rlpt.engine import LLM, SamplingParams
    outs = LLM(model, tokenizer).generate(prompts, SamplingParams(n=8, temperature=1.0, max_tokens=32))

Files, one concept each: sampling (params, counter RNG), sequence (state), block_manager (paged blocks,
refcounts, copy-on-write), radix_cache (prefix index), paged_attention (KV pool, attention through block
tables), model_runner (one flat forward per step), scheduler (continuous batching, chunked prefill,
preemption), spec_decode (draft + exact rejection sampling), llm (the engine), backend (the RL rollout
contract), weights (what is served: gpt_mini or a HF Llama / Qwen2 / Mistral, read in place, LoRA merged),
naive (the reference decode loop).
"""
from rlpt.engine.backend import EngineBackend
from rlpt.engine.llm import LLM
from rlpt.engine.sampling import SamplingParams
from rlpt.engine.sequence import CompletionOutput, RequestOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineBackend"]
