"""rollout.backend=vllm without vLLM: what rlpt/engine/vllm_backend.py does before and around vLLM, checked on any
machine. The config accepts the key; a missing vLLM is one ConfigError naming it and how to install; seeds come from
the run's generator exactly as the engine backend draws them; the sampling arguments; the HF directory vLLM is built
from (and the weights each reload pushes) computes the model's own logits, LoRA merged. The real-vLLM tests are
tests/test_vllm_backend.py (skipped where vLLM is not installed)."""
from __future__ import annotations

import sys

import pytest
import torch

from rlpt.config import ConfigError
from rlpt.engine.backend import EngineBackend
from rlpt.engine.vllm_backend import (
    SEED_BOUND,
    VLLMBackend,
    hf_state,
    plan_requests,
    sampling_kwargs,
    weight_signature,
    write_hf_dir,
)
from rlpt.framework.rollout import Rollout
from rlpt.gpt_mini.generate import SamplingParams
from rlpt.train import load_train_job

from conftest import TINY_RL, TOK, tiny_gpt


def test_config_takes_rollout_backend_vllm_and_names_the_key_on_a_typo(tmp_path):
    job = load_train_job(None, [*TINY_RL, f"run.out_dir={tmp_path}", "rollout.backend=vllm"])
    assert job.rollout.backend == "vllm"
    with pytest.raises(ConfigError, match="rollout.backend"):
        load_train_job(None, [*TINY_RL, f"run.out_dir={tmp_path}", "rollout.backend=vlm"])


def test_a_missing_vllm_is_one_config_error_naming_the_key_and_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)          # `import vllm` fails, installed here or not
    with pytest.raises(ConfigError) as e:
        Rollout(tiny_gpt(), TOK, 2, SamplingParams(), backend="vllm")
    msg = str(e.value)
    assert "rollout.backend=vllm" in msg and "make test-vllm" in msg and "pip install vllm==0.33.0" in msg
    assert "rollout.backend=engine" in msg and "\n" not in msg                      # the way out, on one line
    rollout = Rollout(tiny_gpt(), TOK, 2, SamplingParams(), backend="engine")
    with pytest.raises(ConfigError, match="rollout.backend=vllm"):
        rollout.use_backend("vllm")
    with pytest.raises(ValueError, match="processed_logprobs"):     # checked before vLLM is even imported
        VLLMBackend(logprobs_mode="raw_logprobs")


def test_rlpt_train_without_vllm_stops_before_the_sft_start_and_leaves_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    from rlpt.train import run_train
    job = load_train_job(None, [*TINY_RL, f"run.out_dir={tmp_path / 'runs'}", "rollout.backend=vllm", "steps=1"])
    with pytest.raises(ConfigError, match="rollout.backend=vllm needs vLLM"):
        run_train(job)
    assert not (tmp_path / "runs").exists()


def test_seeds_come_from_the_generator_as_the_engine_backend_draws_them():
    prompts = [[5, 6], [7], [5, 6], [7], [8, 9, 10], [5, 6]]
    keys, groups, seeds = plan_requests(prompts, 0.7, torch.Generator().manual_seed(7))
    assert keys == [(5, 6), (7,), (8, 9, 10)] and groups == [[0, 2, 5], [1, 3], [4]]
    assert seeds == torch.randint(0, 2 ** 62, (3,), generator=torch.Generator().manual_seed(7)).tolist()
    assert all(0 <= s < SEED_BOUND and s + len(g) < 2 ** 63 for s, g in zip(seeds, groups))
    # the generator advances exactly as under rollout.backend=engine: switching backends keeps the run's RNG stream
    g_vllm, g_engine = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    plan_requests(prompts, 1.0, g_vllm)
    EngineBackend()(tiny_gpt(), prompts, SamplingParams(max_tokens=2, temperature=1.0), TOK.eos_id, TOK.pad_id,
                    g_engine)
    assert torch.equal(g_vllm.get_state(), g_engine.get_state())
    assert plan_requests(prompts, 1.0, torch.Generator().manual_seed(11))[2] != \
        plan_requests(prompts, 1.0, torch.Generator().manual_seed(12))[2]
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    assert plan_requests(prompts, 0.0, g)[2] == [None, None, None]                     # greedy draws nothing
    assert torch.equal(g.get_state(), before)
    with pytest.raises(ValueError, match="empty"):
        plan_requests([[1], []], 1.0)


def test_sampling_arguments_ask_for_processed_logprobs_of_the_sampled_token_and_stop_on_eos_only():
    sp = SamplingParams(max_tokens=12, temperature=0.7, top_p=0.9, top_k=0)
    assert sampling_kwargs(sp, 4, 123, eos_id=11) == {
        "n": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_tokens": 12, "logprobs": 0, "seed": 123,
        "stop_token_ids": [11], "ignore_eos": True, "detokenize": False}
    assert sampling_kwargs(SamplingParams(max_tokens=12, top_k=5), 1, None, 2, max_tokens=3)["max_tokens"] == 3


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def test_the_directory_vllm_is_built_from_computes_the_models_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([TOK.encode("<12+7+9>28#"), TOK.encode("(1+2)*3=9#x")])
    for tied in (True, False):
        gpt = tiny_gpt(seed=1, std=0.1, tie_embeddings=tied)
        out = write_hf_dir(gpt, tmp_path / f"gpt_{tied}")
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
        assert hf.config.architectures == ["LlamaForCausalLM"]
        assert ("lm_head.weight" in hf_state(gpt)) is not tied               # a tied head is vLLM's to tie
        torch.testing.assert_close(_logits(hf, ids), _logits(gpt, ids), atol=1e-5, rtol=0)
    assert hf_state(gpt, torch.bfloat16)["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_a_lora_policy_is_written_and_pushed_merged_and_its_changes_are_seen(tmp_path):
    pytest.importorskip("peft")
    import transformers

    from rlpt.models.hf import HFPolicy, gpt_mini_to_hf
    from rlpt.models.lora import LoraSpec, apply_lora
    ids = torch.tensor([TOK.encode("<12+7+9>28#")])
    policy = apply_lora(HFPolicy(gpt_mini_to_hf(tiny_gpt(seed=2, std=0.1, tie_embeddings=False))),
                        LoraSpec(r=4, alpha=8))
    sig = weight_signature(policy)
    with torch.no_grad():                                   # B = 0 at init: give the adapters a real delta
        g = torch.Generator().manual_seed(0)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    assert weight_signature(policy) != sig                                   # an in-place update is seen
    out = write_hf_dir(policy, tmp_path / "lora")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    assert not any("lora_" in k or "base_layer" in k for k in hf_state(policy))
    torch.testing.assert_close(_logits(merged, ids), _logits(policy, ids), atol=1e-5, rtol=0)
    base = policy.model.get_base_model()
    sig = weight_signature(policy)
    with policy.model.disable_adapter():
        assert weight_signature(policy) != sig                               # adapters off: another function
        assert (_logits(base, ids) - _logits(merged, ids)).abs().max() > 1e-2
    assert weight_signature(policy) == sig


def test_vllm_calls_leave_the_runs_global_rngs_and_matmul_precision_as_they_were():
    import random

    import numpy as np

    from rlpt.engine.vllm_backend import _kept_globals
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    precision = torch.get_float32_matmul_precision()
    with _kept_globals():        # what vLLM's worker start does in this process (set_random_seed), and more draws
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        np.random.randint(0, 10)
        torch.set_float32_matmul_precision("medium" if precision != "medium" else "high")
    assert torch.get_float32_matmul_precision() == precision
    got = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    assert torch.equal(got[0], torch.rand(3)) and got[1] == random.random() and got[2] == np.random.rand()
