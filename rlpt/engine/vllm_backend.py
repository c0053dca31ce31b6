"""The rollout backend `rollout.backend=vllm`: EngineBackend's contract (rlpt/engine/backend.py), served by vLLM.

    backend = VLLMBackend()                    # needs vLLM, on a CUDA machine (`make test-vllm` installs it)
    samples = backend(model, prompts, SamplingParams(max_tokens, temperature, top_p, top_k), eos_id, pad_id, generator)
    samples[i].tokens / .logps / .finish_reason          # one Sample per prompt, in order, as EngineBackend's

`model` is what the engine backend takes: a gpt_mini GPT, or a HF Llama-family causal LM (bare, an HFPolicy, or
under a peft LoRA adapter: served merged, W + α/r·BA). vLLM is imported when a VLLMBackend is made, never at
rlpt's import; without it that is one ConfigError naming rollout.backend=vllm and how to install it.

How it keeps the contract:
- **Old log-probs.** vLLM's sampler returns raw log-probs (before temperature) unless the engine is built with
  `logprobs_mode="processed_logprobs"`: then the log-prob of each sampled token under the distribution it was drawn
  from (temperature, top-k, top-p applied), what rlpt records as old_logp (lesson 02; the research notes' "6-day"
  temperature bug). It is enforced: any other `logprobs_mode` is a ValueError. `logprobs=0` asks for the sampled
  token's log-prob only.
- **Seeds from the run's generator.** Identical prompts (the K samples of a group) become one request with n = K;
  one seed per distinct prompt is drawn from `generator` exactly as EngineBackend draws it
  (`torch.randint(0, 2**62, (distinct,))`, nothing at temperature 0), so the generator's state advances the same
  under either backend and a run is reproducible from it. vLLM seeds child j of a request with `seed + j`.
- **Stopping.** Only rlpt's stop ids stop a sample (`stop_token_ids=` the tokenizer's EOS and what the model's
  generation_config lists, rlpt.gpt_mini.generate.stop_ids; `ignore_eos=True` so vLLM adds none of its own); the
  stop token is kept in `tokens`, as the engine keeps it. A sample that ends on one is "stop", also on the last
  token of its budget; any other is vLLM's "length".
- **Weights.** The engine is built from a temporary HF directory (config.json +
  model.safetensors, written from the model's current weights). Before each generate the parameters' version
  counters (and LoRA enable flags) are compared with those last loaded; on a change (a trainer step, a weight
  sync, another model object of the same shape) every weight is pushed in HF checkpoint names through vLLM's
  in-place reload, `llm.collective_rpc("reload_weights", kwargs={"weights_iterator": [(name, tensor), ...],
  "is_checkpoint_format": True})` (vllm 0.33 / 0.34: `Worker.reload_weights` -> `model_runner.reload_weights` ->
  model_loader/reload: `model.load_weights` between `start_reload` / `finish_reload`, the loader's post-processing
  re-run), and the prefix cache is dropped: no K/V of old weights survives. (A second bare `model.load_weights`
  after init fails on vLLM's repacked parameters: the research notes §4.2.) The tensors go by reference because
  the engine core runs in this process: VLLM_ENABLE_V1_MULTIPROCESSING defaults to 0 here (vLLM's own default is
  a separate process, where an RPC's tensors arrive as raw (dtype, shape, bytes) lists, not tensors). Where the
  variable is set to 1 anyway, the directory is rewritten and `reload_weights(weights_path=dir)` reads it.
  vLLM seeds the global RNGs when its worker starts and sets torch's float32 matmul precision; rlpt's are put back
  around every vLLM call (`_kept_globals`). In this process vLLM's extensible KV cache is off: it would cap the whole
  process's torch allocator, the trainer's included.
- **One engine per process**, shared by every VLLMBackend (the rollout's and evaluate's) while the architecture and
  the LLM arguments stay the same (another replaces it), since a vLLM engine owns a share of the GPU
  (`gpu_memory_utilization`, 0.3 here by default: the trainer lives on the same card) and vLLM keeps process-wide
  state (distributed groups) that two in-process engines would share. `shutdown_engines()` frees it.

Differences from EngineBackend: vLLM runs on its own device (a GPU) in its own dtype (the model's, unless
`dtype=` is given); its kernels are not rlpt's, so sampled tokens differ from the engine's at temperature > 0 (the
same seeds drive other draws) and log-probs agree with the trainer's to float rounding, not bit for bit.
`on_sample` is called after the whole batch, in prompt order (LLM.generate returns at the end).

Verified where: the parts that need no vLLM (config, the missing-vLLM error, seeds, sampling arguments, the HF
directory written for vLLM) by tests/test_vllm_plumbing.py everywhere; tests/test_vllm_backend.py needs vLLM
(vllm==0.33.0) and, for its engine tests, a CUDA machine (`make test-vllm`), else it is reported as skipped;
bench/vllm_weights_check.py checks the weight names and the in-place reload against vLLM's own model classes
without a GPU. docs/real_models.md ("The vLLM backend") says what ran where.
"""
from __future__ import annotations

import copy
import gc
import importlib
import json
import os
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch

from rlpt.engine.backend import SEED_BOUND, plan_requests  # noqa: F401  (SEED_BOUND: re-exported)
from rlpt.gpt_mini.generate import Sample, stop_set
from rlpt.run import rng_state, set_rng_state
from rlpt.validate import ConfigError

LOGPROBS_MODE = "processed_logprobs"
# in rlpt's process a vLLM engine shares the card with the trainer: a fixed share (0.3), and (vLLM >= 0.34) no
# extensible KV cache, which would cap *this process's* torch allocator (torch.cuda.set_per_process_memory_fraction),
# the trainer's too; passed only where vLLM has the option (`_supported`)
DEFAULT_LLM_KWARGS = {"gpu_memory_utilization": 0.3, "enable_extensible_kv_cache": False,
                      "enable_prefix_caching": True, "seed": 0}
FIXED = ("model", "tokenizer", "skip_tokenizer_init")      # set by the backend itself
VLLM_PIN = "vllm==0.33.0"         # pyproject's `vllm` extra; 0.34.0 pins flashinfer-python==0.7.3, not on PyPI
INSTALL = ("rollout.backend=vllm needs vLLM, which cannot be imported here ({why}). It is an optional extra for a "
           f"CUDA machine: `make test-vllm` builds .venv-vllm with it and runs its tests (by hand: `pip install "
           f"--no-deps -e .`, then `pip install {VLLM_PIN}` with rlpt's other requirements but torch; pip cannot "
           "resolve `pip install -e '.[vllm]'`: vLLM's torch==2.14.0 against rlpt's torch==2.13.0 pin); on a "
           "machine without it use rollout.backend=engine (the default)")
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def import_vllm():
    """The vllm module, or a ConfigError naming rollout.backend=vllm and how to install it. The engine core runs in
    this process unless VLLM_ENABLE_V1_MULTIPROCESSING says otherwise (see the module doc)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as e:       # also a broken install (a missing CUDA library, a torch it was not built for)
        raise ConfigError(INSTALL.format(why=f"{type(e).__name__}: {e}")) from e
    return vllm


def sampling_kwargs(sp, n: int, seed: int | None, eos_id: int, max_tokens: int | None = None) -> dict:
    """vllm.SamplingParams(**these) for rlpt's `sp` (max_tokens, temperature, top_p, top_k; top_k 0 = off in both)."""
    return {"n": n, "temperature": float(sp.temperature), "top_p": float(sp.top_p), "top_k": int(sp.top_k),
            "max_tokens": int(sp.max_tokens if max_tokens is None else max_tokens), "logprobs": 0,
            "seed": seed, "stop_token_ids": list(stop_set(eos_id)), "ignore_eos": True, "detokenize": False}


def to_sample(completion, eos_id: int) -> Sample:
    """A vLLM CompletionOutput -> rlpt's Sample (the log-prob of each sampled token, from `logprobs=0`)."""
    tokens = [int(t) for t in completion.token_ids]
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a sample with finish_reason={completion.finish_reason!r} "
                           "(aborted?); rlpt only knows 'stop' and 'length'")
    if completion.logprobs is None or len(completion.logprobs) != len(tokens):
        raise RuntimeError("vLLM returned no log-prob per sampled token: the request must set logprobs=0")
    logps = [float(completion.logprobs[j][t].logprob) for j, t in enumerate(tokens)]
    reason = "stop" if tokens and tokens[-1] in stop_set(eos_id) else completion.finish_reason
    return Sample(tokens, logps, reason)


# -- the model as a HF checkpoint ------------------------------------------------------------------------------
def _is_gpt_mini(model) -> bool:
    from rlpt.gpt_mini.model import GPT
    return isinstance(model, GPT)


def _hf_module(model):
    """An HFPolicy -> its HF model; a peft model -> the base model (the LoRA layers are inside it)."""
    for _ in range(4):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "new_cache") and hasattr(getattr(model, "model", None), "config"):
            model = model.model
        else:
            break
    if not hasattr(model, "config") or not hasattr(model, "state_dict"):
        raise ValueError(f"rollout.backend=vllm serves gpt_mini and Hugging Face causal LMs, "
                         f"got {type(model).__name__}")
    return model


def _has_lora(model) -> bool:
    return any(hasattr(m, "lora_A") for m in model.modules())


def hf_config(model):
    """The transformers config vLLM builds its model from (`architectures` set, which vLLM picks the class by)."""
    if _is_gpt_mini(model):
        from rlpt.models.hf import gpt_mini_to_hf
        config = gpt_mini_to_hf(model).config
        config.architectures = ["LlamaForCausalLM"]
        return config
    hf = _hf_module(model)
    config = copy.deepcopy(hf.config)
    config.architectures = [type(hf).__name__]
    return config


def hf_state(model, dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """The model's weights under HF checkpoint names, on `device` (None: where they are) in `dtype` (None: theirs),
    LoRA merged in, a tied head left out (vLLM ties it itself): what vLLM loads at start and each update pushes."""
    if _is_gpt_mini(model):
        from rlpt.models.hf import _to_hf_name, check_llama_form
        check_llama_form(model.cfg)
        state, tied = {_to_hf_name(k): v for k, v in model.state_dict().items()}, model.cfg.tie_embeddings
    else:
        hf = _hf_module(model)
        if _has_lora(hf):
            from rlpt.models.lora import merged_state_dict
            state = merged_state_dict(model)
        else:
            state = hf.state_dict()
        tied = bool(getattr(hf.config.get_text_config(decoder=True), "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to(device=device or v.device, dtype=dtype or v.dtype).contiguous() for k, v in state.items()}


def write_hf_dir(model, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """config.json + model.safetensors of `model`, the directory vLLM (or transformers) loads."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config(model).save_pretrained(out)
    save_file({k: v.clone() for k, v in hf_state(model, dtype).items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def weight_signature(model) -> tuple:
    """Changes whenever what the model computes may have: an in-place update bumps a parameter's version counter;
    `disable_adapter()` flips a LoRA flag without touching a parameter."""
    params = tuple((p.data_ptr(), p._version) for p in model.parameters())
    lora = tuple((getattr(m, "merged", False), getattr(m, "disable_adapters", False),
                  tuple(getattr(m, "active_adapters", ()))) for m in model.modules() if hasattr(m, "lora_A"))
    return params, lora


# -- the engines ------------------------------------------------------------------------------------------------
@contextmanager
def _kept_globals():
    """vLLM seeds the global RNGs when it starts a worker, and draws from numpy's for unseeded requests, and sets
    torch's float32 matmul precision (in this process, with the in-process engine core): put the run's back, so
    rlpt's RNG stream (checkpointed for a bit-identical resume) and its matmuls do not depend on vLLM."""
    state, precision = rng_state(), torch.get_float32_matmul_precision()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        set_rng_state(state)
        torch.set_float32_matmul_precision(precision)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class _Served:
    """One vLLM engine, the directory it was built from, and which weights it holds now."""

    def __init__(self, llm, tmp, dtype: torch.dtype, max_model_len: int, inproc: bool):
        self.llm, self.tmp, self.dtype, self.max_model_len, self.inproc = llm, tmp, dtype, max_model_len, inproc
        self.holder, self.signature = None, None        # weakref to the model last loaded, its weight_signature
        self.reloads = 0

    def push(self, model) -> None:
        """`model`'s current weights into the engine, in place (reload_weights re-runs the loader's post-processing),
        then the prefix cache dropped. In-process: the tensors themselves; else the RPC carries only the directory,
        which is rewritten first (vLLM's advice: control messages over RPC, data another way)."""
        if self.inproc:
            kwargs = {"weights_iterator": list(hf_state(model, self.dtype, device=None).items())}
        else:
            write_hf_dir(model, self.tmp.name, self.dtype)
            kwargs = {"weights_path": self.tmp.name}
        self.llm.collective_rpc("reload_weights", kwargs={**kwargs, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.holder, self.signature, self.reloads = weakref.ref(model), weight_signature(model), self.reloads + 1


_ENGINES: dict[str, _Served] = {}


def shutdown_engines() -> None:
    """Drop the vLLM engine of this process, if any, and vLLM's process-wide state with it (its distributed groups:
    `cleanup_dist_env_and_memory`, what vLLM's own tests call between two LLMs in one process)."""
    if not _ENGINES:
        return
    for served in list(_ENGINES.values()):
        core = getattr(getattr(served.llm, "llm_engine", None), "engine_core", None)
        if hasattr(core, "shutdown"):          # stop the engine core (and its process, if it has one) now
            core.shutdown()
        served.llm = None
        served.tmp.cleanup()
    _ENGINES.clear()
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    cleanup_dist_env_and_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _supported(vllm, kwargs: dict) -> dict:
    """The defaults this vLLM's EngineArgs knows (enable_extensible_kv_cache is new in 0.34)."""
    import dataclasses
    known = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    return {k: v for k, v in kwargs.items() if k in known}


class VLLMBackend:
    def __init__(self, **llm_kwargs):
        mode = llm_kwargs.pop("logprobs_mode", LOGPROBS_MODE)
        if mode != LOGPROBS_MODE:
            raise ValueError(f"rollout.backend=vllm records old_logp, which needs logprobs_mode={LOGPROBS_MODE!r} "
                             f"(the sampled distribution: temperature, top-k, top-p applied), got {mode!r}")
        fixed = [k for k in FIXED if k in llm_kwargs]
        if fixed:
            raise ValueError(f"VLLMBackend sets {', '.join(fixed)} itself (the model is written to a temporary HF "
                             "directory; prompts are token ids)")
        self.vllm = import_vllm()
        self.llm_kwargs = {**_supported(self.vllm, DEFAULT_LLM_KWARGS), **llm_kwargs}
        self._keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()    # model -> (key, dtype, config)

    def _key(self, model, config) -> tuple[str, torch.dtype]:
        dtype = self.llm_kwargs.get("dtype")
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or next(model.parameters()).dtype
        if dtype not in _DTYPES:
            raise ValueError(f"rollout.backend=vllm serves float32, bfloat16 or float16 weights, got {dtype}")
        kw = {k: v for k, v in self.llm_kwargs.items() if k != "dtype"}
        return json.dumps([config.to_dict(), _DTYPES[dtype], repr(sorted(kw.items()))], sort_keys=True,
                          default=str), dtype

    def engine(self, model):
        """The vLLM LLM for `model`'s architecture, holding `model`'s current weights."""
        if model not in self._keys:           # the shape never changes under training: computed once per model
            config = hf_config(model)
            self._keys[model] = (*self._key(model, config), config)
        key, dtype, config = self._keys[model]
        served = _ENGINES.get(key)
        if served is None:
            shutdown_engines()                  # one engine per process: another shape or other kwargs replace it
            tmp = tempfile.TemporaryDirectory(prefix="rlpt-vllm-")
            write_hf_dir(model, tmp.name, dtype)
            kwargs = {k: v for k, v in self.llm_kwargs.items() if k != "dtype"}
            inproc = not importlib.import_module("vllm.envs").VLLM_ENABLE_V1_MULTIPROCESSING
            with _kept_globals():
                llm = self.vllm.LLM(model=tmp.name, skip_tokenizer_init=True, dtype=_DTYPES[dtype],
                                    logprobs_mode=LOGPROBS_MODE, **kwargs)
            max_len = int(kwargs.get("max_model_len") or config.max_position_embeddings)
            served = _ENGINES[key] = _Served(llm, tmp, dtype, max_len, inproc)
            served.holder, served.signature = weakref.ref(model), weight_signature(model)
        if served.holder() is not model or served.signature != weight_signature(model):
            with _kept_globals():
                served.push(model)
        return served

    def reset_prefix_caches(self) -> None:
        """Forget every cached prefix of every engine (EngineBackend's hook: a step depends on weights + RNG)."""
        for served in _ENGINES.values():
            served.llm.reset_prefix_cache()

    def __call__(self, model, prompts: list[list[int]], sp, eos_id: int, pad_id: int,
                 generator: torch.Generator | None = None, on_sample=None) -> list[Sample]:
        keys, groups, seeds = plan_requests(prompts, sp.temperature, generator)
        served = self.engine(model)
        too_long = [i for i, k in enumerate(keys) if len(k) >= served.max_model_len]
        if too_long:
            raise ValueError(f"a prompt of {len(keys[too_long[0]])} tokens leaves no room to generate within "
                             f"max_model_len={served.max_model_len}")
        params = [self.vllm.SamplingParams(**sampling_kwargs(
            sp, len(g), s, eos_id, min(sp.max_tokens, served.max_model_len - len(k))))
            for k, g, s in zip(keys, groups, seeds)]
        with _kept_globals():
            outs = served.llm.generate([{"prompt_token_ids": list(k)} for k in keys], sampling_params=params,
                                       use_tqdm=False)
        samples: list[Sample | None] = [None] * len(prompts)
        for g, out in zip(groups, outs):
            if len(out.outputs) != len(g):
                raise RuntimeError(f"vLLM returned {len(out.outputs)} samples for a request of n={len(g)}")
            for i, c in zip(g, out.outputs):
                samples[i] = to_sample(c, eos_id)
        for i, s in enumerate(samples) if on_sample is not None else ():
            on_sample(i, s)
        return samples
