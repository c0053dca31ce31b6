"""`rlpt train model.hf_path=<dir>`: GRPO on a Hugging Face policy (an `rlpt export`ed gpt_mini), full or LoRA.

The start is a tiny gpt_mini after a short CoT SFT (mixed groups, so steps train), exported once per module.
Checked: the run-time log-prob check passes on engine rollouts; under LoRA the base stays bit-identical, only
adapters move and π_ref is the base; a resume from step 2 equals an uninterrupted 3-step run; bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from rlpt.config import ConfigError  # noqa: E402
from rlpt.models.hf import load_hf_policy  # noqa: E402
from rlpt.train import load_train_job, run_train  # noqa: E402

from conftest import HF_FAST, TOK, export_tiny_sft, hf_job  # noqa: E402

FAST = HF_FAST
IDS = torch.tensor([TOK.encode("<12+7+9>28#"), TOK.encode("(1+2)*3=9#x")])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny gpt_mini after 30 CoT SFT steps, exported with `rlpt export` (conftest.export_tiny_sft)."""
    return export_tiny_sft(tmp_path_factory.mktemp("hf_train"))


_job = hf_job


def _trained(policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.named_parameters() if v.requires_grad}


def test_full_fine_tuning_of_an_hf_policy_trains_with_the_logp_check(tmp_path, hf_dir):
    ctl, run, _ = run_train(_job(tmp_path, hf_dir, "steps=3"))
    rows = [json.loads(r) for r in (run.dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r.get("step/skipped") == 0.0]
    assert trained, "no step trained (all groups degenerate)"
    assert all(r["check/logp_mismatch"] < 1e-4 for r in trained)       # the check ran (and raised on none)
    assert type(ctl.trainer.model.model).__name__ == "LlamaForCausalLM"
    assert ctl.rollout.backend == "engine"
    base = load_hf_policy(hf_dir)
    assert not all(torch.equal(a, b) for a, b in zip(base.state_dict().values(),
                                                        ctl.trainer.model.state_dict().values()))
    meta_keys = set(ctl.trainer.model.state_dict())
    from safetensors.torch import load_file
    saved = load_file(str(run.dir / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert set(saved) <= meta_keys and len(saved) >= len(meta_keys) - 1   # full weights (a tied head once)
    broken = _job(tmp_path, hf_dir, "steps=3", "run.name=resumed", "ckpt_every=2")
    _, run_b, _ = run_train(broken)
    shutil.rmtree(run_b.dir / "checkpoints" / "step_00000003")
    (run_b.dir / "checkpoints" / "latest").write_text("step_00000002")
    ctl_b, _, _ = run_train(broken, resume=True)                        # resume after step 2 == 3 straight steps
    for (k, a), b in zip(ctl.trainer.model.state_dict().items(), ctl_b.trainer.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_lora_keeps_the_base_bit_identical_and_resumes_exactly(tmp_path, hf_dir):
    lora = ["lora.r=4", "lora.alpha=8", "trainer.optim.lr=5e-3", "trainer.grad_checkpointing=true"]
    ctl, run, _ = run_train(_job(tmp_path, hf_dir, "steps=3", "run.name=straight", *lora))
    policy = ctl.trainer.model
    assert policy.grad_checkpointing and ctl.syncer.bytes_last > 0
    assert ctl.rollout.model.shares_base_with(policy)                                # lora.sync=adapters: one base
    assert ctl.syncer.bytes_last == sum(v.numel() * 4 for v in _trained(policy).values())   # the adapters only
    rows = [json.loads(r) for r in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if r.get("step/skipped") == 0.0]
    assert all(r["check/logp_mismatch"] < 1e-4 for r in rows if "check/logp_mismatch" in r)
    base = load_hf_policy(hf_dir)
    frozen = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in policy.model.state_dict().items() if "lora_" not in k}
    for k, v in base.model.state_dict().items():
        assert torch.equal(frozen[k], v), k                                          # base bit-identical
    trained = _trained(policy)
    assert trained and all("lora_" in k for k in trained)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)         # the adapters moved
    with torch.no_grad():
        assert torch.equal(ctl.reference.model(IDS), base(IDS))                        # π_ref = the base, exactly
        assert not torch.equal(policy(IDS), base(IDS))
    ck = run.dir / "checkpoints" / "step_00000003"
    from safetensors.torch import load_file
    assert all("lora_" in k for k in load_file(str(ck / "model.safetensors")))       # adapters only
    rollout_state = torch.load(ck / "state.pt", weights_only=False)["rollout"]["model"]
    assert rollout_state.keys() == ctl.rollout.model.state_dict().keys()             # no second copy of the base
    assert rollout_state and all("lora_" in k for k in rollout_state)

    # a crash after step 2: rerun with ckpt_every=2, drop step 3, resume
    broken = _job(tmp_path, hf_dir, "steps=3", "run.name=resumed", "ckpt_every=2", *lora)
    _, run_b, _ = run_train(broken)
    shutil.rmtree(run_b.dir / "checkpoints" / "step_00000003")
    (run_b.dir / "checkpoints" / "latest").write_text("step_00000002")
    ctl_b, _, _ = run_train(broken, resume=True)
    resumed = _trained(ctl_b.trainer.model)
    assert resumed.keys() == trained.keys()
    for k in trained:
        assert torch.equal(trained[k], resumed[k]), k


@pytest.mark.slow
def test_lora_merged_sync_trains_with_the_logp_check(tmp_path, hf_dir):
    ctl, run, _ = run_train(_job(tmp_path, hf_dir, "steps=2", "lora.r=4", "lora.alpha=8", "lora.sync=merged",
                                 "trainer.optim.lr=5e-3"))
    rows = [json.loads(r) for r in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if r.get("step/skipped") == 0.0]
    assert all(r["check/logp_mismatch"] < 1e-4 for r in rows if "check/logp_mismatch" in r)
    assert not any("lora_" in n for n, _ in ctl.rollout.model.named_parameters())   # a plain HF model
    with torch.no_grad():
        torch.testing.assert_close(ctl.rollout.model(IDS), ctl.trainer.model(IDS), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_lora_bf16_with_grad_checkpointing_trains_under_the_bf16_check(tmp_path, hf_dir):
    ctl, run, _ = run_train(_job(tmp_path, hf_dir, "steps=2", "lora.r=4", "lora.alpha=8", "trainer.optim.lr=5e-3",
                                 "trainer.precision=bf16", "trainer.grad_checkpointing=true"))
    rows = [json.loads(r) for r in (run.dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r.get("step/skipped") == 0.0]
    assert trained and all("trainer/bf16_native" in r for r in trained)               # bf16 autocast was on
    assert all(0 < r["check/logp_mismatch_mean"] < 1e-2 for r in trained)            # bf16 vs the fp32 rollout
    assert ctl.trainer.model.grad_checkpointing and ctl.rollout.model.shares_base_with(ctl.trainer.model)


def test_bad_hf_settings_name_the_key(tmp_path, hf_dir):
    with pytest.raises(ConfigError, match="model.hf_path.*not a directory"):
        _job(tmp_path, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.hf_path.*no config.json"):
        _job(tmp_path, tmp_path / "empty")
    with pytest.raises(ConfigError, match="lora.r=4 needs model.hf_path"):
        load_train_job(None, [*FAST, "lora.r=4"])
    with pytest.raises(ValueError, match="sync.lag=1 with lora.sync=merged"):
        run_train(_job(tmp_path, hf_dir, "lora.r=4", "lora.sync=merged", "sync.lag=1"))
    with pytest.raises(ConfigError, match="lora.sync"):
        _job(tmp_path, hf_dir, "lora.r=4", "lora.sync=full")
    with pytest.raises(ConfigError, match="init_from and model.hf_path"):
        _job(tmp_path, hf_dir, "init_from=runs/x")
    with pytest.raises(ConfigError, match="max_position_embeddings=.*longest prompt"):
        _job(tmp_path, hf_dir, "task.max_operands=12", "task.max_value=999")
    seq = tmp_path / "seq2seq"
    seq.mkdir()
    (seq / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(ConfigError, match="model.hf_path.*T5ForConditionalGeneration.*not a causal LM"):
        _job(tmp_path, seq)


def test_a_tokenizer_other_than_gpt_minis_is_refused(tmp_path, hf_dir):
    other = tmp_path / "other_tok"
    shutil.copytree(hf_dir, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]          # two digits' ids swapped
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="model.hf_path.*not gpt_mini's character tokenizer"):
        run_train(_job(tmp_path, other, "steps=1"))
    assert not (tmp_path / "runs" / "grpo").exists()           # a failed start leaves no run folder



GPU_CHECK = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


def test_gpu_check_script_parses():
    out = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert os.access(GPU_CHECK, os.X_OK)


@pytest.mark.slow
def test_gpu_check_dry_run_runs_a_grpo_step_on_the_cpu():
    """bench/gpu_check.sh --dry-run: the device script's whole path (engine rollout of the adapter copy, π_ref with
    adapters off, bf16 + checkpointed LoRA train step, adapter-only sync, the fwd+bwd variants) on a tiny config."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    out = subprocess.run([str(GPU_CHECK), "--dry-run"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "gpu_check" and result["dry_run"] and result["device"] == "cpu"
    assert result["roles"].keys() == {"rollout", "ref", "train", "sync"}
    assert result["sampler"] == {"name": "engine", "error": None}
    assert result["fwd_bwd"].keys() == {"bf16+ckpt", "bf16", "fp32+ckpt", "fp32"}
    assert result["loss_finite"] and result["logp_mismatch_mean"] < 1e-2           # bf16 trainer vs fp32 rollout
    # the adapters only: r (d_in + d_out) per adapted linear (q k v o gate up down), fp32
    s = result["shape"]
    d, f, kv = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_attention_heads"] * 2
    per_layer = 2 * (d + d) + 2 * (d + kv) + 2 * (d + f) + (f + d)
    assert result["sync_bytes"] == 4 * 4 * s["num_hidden_layers"] * per_layer == 4 * result["trainable"]
