"""rlpt.perf against the course's worked examples and widget defaults (lessons 20, 22, 22a, 22b, 22c, 25, 28).

Where the course's own arithmetic is off, the test asserts the exact value and a comment says what the course
printed (marked "course printed"). Units: GB = 1e9, GiB = 2**30, as each lesson uses them.
"""
import json
import math
import struct
import subprocess
import sys

import pytest

from rlpt.config import ConfigError
from rlpt.perf import configs, flops, memory, throughput
from rlpt.perf.configs import ModelShape, named
from rlpt.perf.memory import GB, GiB
from rlpt.perf.throughput import RoleTimes

from conftest import tiny_gpt

LLAMA8, LLAMA70, QWEN7 = configs.REAL["llama-3-8b"], configs.REAL["llama-3-70b"], configs.REAL["qwen2.5-7b"]


# -- lesson 22: bytes per parameter ------------------------------------------------------------------------
def test_bytes_per_param():
    assert memory.precision("bf16-mixed").total == 18      # 2 bf16 + 4 fp32 master + 4 fp32 grad + 4 + 4 AdamW
    assert memory.precision("fp32").total == 16            # "16 without the master copy": fp32 weights are it
    # course printed "12 with bf16 Adam state"; 2 + 4 + 4 + 2 + 2 = 14 (12 needs more than bf16 m and v)
    assert memory.precision("bf16-adam").total == 14
    with pytest.raises(ConfigError, match="unknown training precision"):
        memory.precision("fp4")


def test_training_state_examples():
    assert memory.train_bytes(7e9) == 126e9                 # 7 B -> 126 GB -> 2 H100 with FSDP
    assert memory.min_gpus(7e9) == 2
    assert memory.train_bytes(70e9) == pytest.approx(1.26e12)
    assert memory.min_gpus(70e9) == 16
    # course: 70 B on 16 H100 is "tight": 78.75 GB per GPU before any activation
    assert memory.train_bytes(70e9) / 16 == pytest.approx(78.75e9)
    assert memory.train_bytes(405e9) == pytest.approx(7.29e12)
    # course printed "96× H100 minimum" (12 whole nodes of 8); the state alone needs ⌈7.29 TB / 80 GB⌉ = 92
    assert memory.min_gpus(405e9) == 92


def test_activations_7b_8k_batch4():
    # 32 · 8192 · 4 · (12·4096 + 2·8192) · 2 = 137.4 GB, more than the 126 GB of weights and optimizer
    act = memory.activation_bytes(32, 8192, 4, 4096, 2)
    assert act == 32 * 8192 * 4 * (49152 + 16384) * 2 == 137_438_953_472
    assert act > memory.train_bytes(7e9)
    assert memory.activation_bytes(32, 8192, 4, 4096, 2, "full") == act / 8
    assert memory.activation_bytes(32, 8192, 4, 4096, 2, "selective") == 32 * 8192 * 4 * 49152 * 2
    with pytest.raises(ConfigError):
        memory.activation_bytes(32, 8192, 4, 4096, 2, "some")


def test_logits_and_trainer_memory():
    # lesson 25: naive log-probs at 32k tokens × 128k vocab in bf16 hold 8 GB of logits (and as much again each
    # for the softmax and the backward)
    assert memory.logits_bytes(32768, 128000, 2) / GB == pytest.approx(8.4, abs=0.05)
    s = ModelShape("g", 4, 128, 4, 4, 32, 352, 50, True)
    m = memory.trainer_memory(s, rows=8, seq=64)
    assert m.state == 16 * s.params                                    # fp32 weights, grads, AdamW m and v
    assert m.activations == 4 * 64 * 8 * (12 * 128 + 2 * 64) * 4
    assert m.logits == 8 * 64 * 50 * 4 * 4
    assert m.total == m.state + m.activations + m.logits
    assert m.transient == 4 * s.params + m.activations + m.logits      # weights and AdamW stay between steps
    rl = memory.trainer_memory(s, rows=8, seq=64, activations="llama")
    assert rl.activations == 4 * 64 * 8 * (12 * 128 + 4 * 352 + 4 * 128) * 4


# -- lesson 20: KV per token -----------------------------------------------------------------------------
def test_kv_per_token_table():
    assert memory.kv_bytes_per_token(LLAMA8) == 131_072     # 2·32·1024·2 "≈ 131 KB"
    assert memory.kv_bytes_per_token(LLAMA70) == 327_680    # 2·80·1024·2 "≈ 328 KB"
    assert memory.kv_bytes_per_token(QWEN7) == 57_344       # 2·28·512·2 "≈ 57 KB"
    mha7 = ModelShape("mha", 32, 4096, 32, 32, 128)
    mha70 = ModelShape("mha", 80, 8192, 64, 64, 128)
    assert memory.kv_bytes_per_token(mha7) == 524_288       # "524 KB/token" without GQA
    assert memory.kv_bytes_per_token(mha70) == 2_621_440    # "2.6 MB/token"
    # GQA-8 shrinks 7 B's KV 4× and 70 B's 8× (n_heads / n_kv_heads)
    assert memory.kv_bytes_per_token(mha7) / memory.kv_bytes_per_token(named(7)) == 4
    assert memory.kv_bytes_per_token(mha70) / memory.kv_bytes_per_token(LLAMA70) == 8


def test_kv_capacity_70b():
    kv = memory.kv_bytes(LLAMA70, 256 * 8192)
    # course printed "≈ 670 GB" for 70 B with 256 streams of 8 k; exactly 687 GB (decimal) = 640 GiB
    assert kv == pytest.approx(687.19e9, rel=1e-4)
    assert kv / GiB == 640


def test_kv_widget_defaults_and_breaks():
    w = memory.kv_widget()                                   # 7 b, GQA, B = 32, L = 2048
    assert w["kv_per_token"] == 131_072 and w["kv_per_token"] / 1024 == 128     # the widget's "128 KB"
    assert w["total_gib"] == 8.0 and w["free_gb"] == 66
    assert w["step_ms"] == pytest.approx(2.39, abs=0.01)
    assert w["bottleneck"] == "weight bandwidth dominates KV"
    assert memory.kv_widget(256, 4096)["total_gib"] == 128   # "7 B GQA fails once B·L > ~540 k tokens"
    assert memory.kv_widget(256, 4096)["bottleneck"].startswith("HBM capacity")
    # course: "7 B MHA fails at B = 32, L ≥ 4224"; at 4224 the KV is exactly the 66 GiB free, so with the
    # widget's strict ">" the first failing length on its 128-token slider is 4352
    assert memory.kv_widget(32, 4224, gqa=False)["total_gib"] == 66.0
    assert not memory.kv_widget(32, 4224, gqa=False)["bottleneck"].startswith("HBM")
    assert memory.kv_widget(32, 4352, gqa=False)["bottleneck"].startswith("HBM")
    # course: 70 B is always over budget in this widget: 140 GB of weights on one 80 GB GPU
    assert memory.kv_widget(1, 128, model="70b")["free_gb"] == 0
    assert memory.kv_widget(1, 128, model="70b")["bottleneck"].startswith("HBM")


def test_prefix_sharing():
    assert memory.prefix_sharing_ratio(16, 0.1) == pytest.approx(6.15, abs=0.01)   # "K = 16 → ~6.2×"
    assert memory.prefix_sharing_ratio(64, 0.1) == pytest.approx(8.65, abs=0.01)   # "K = 64 → ~8.6×"
    # lesson 20: prompt_blocks + K·completion_blocks instead of K·(prompt_blocks + completion_blocks)
    assert memory.paged_blocks(160, 32, 16) == 10 + 16 * 2
    assert memory.paged_blocks(160, 32, 16, shared=False) == 16 * 12
    # a prompt's partial last block (6 of its 150 tokens) is copied on write into each sample (rlpt.engine, vLLM):
    # 9 shared blocks + 16 · ⌈(6 + 20) / 16⌉
    assert memory.paged_blocks(150, 20, 16) == 9 + 16 * 2


# -- lesson 22: the "Memory envelope" widget ------------------------------------------------------------------
def test_memory_envelope_defaults():
    e = memory.envelope(7)                                  # 7 B, seq 8192, batch 4, 8 GPUs, checkpointing on
    assert e.train_per_gpu / GB == pytest.approx(32.9, abs=0.05)
    assert e.infer_per_gpu / GB == pytest.approx(2.3, abs=0.05)
    assert e.kv_per_token == 131_072                        # the widget's "128 KB"
    assert e.fits


def test_memory_envelope_what_breaks():
    assert memory.envelope(7, checkpoint=False).train_per_gpu / GB == pytest.approx(153, abs=0.5)
    assert memory.envelope(70).train_per_gpu / GB == pytest.approx(233, abs=0.5)
    # course: activations are not divided by G, so 70 B on 64 GPUs still needs 94.8 GB per GPU
    assert memory.envelope(70, gpus=64).train_per_gpu / GB == pytest.approx(94.8, abs=0.05)
    assert not memory.envelope(70, gpus=64).fits
    assert memory.envelope(7, gpus=1).train_per_gpu / GB == pytest.approx(143, abs=0.5)


def test_rl_copies_7b_grpo_on_8_h100():
    """Lesson 22's worked example: trainer on 4 (FSDP), reference on 1, rollout on 3 (TP = 1)."""
    act = memory.activation_bytes(32, 4096, 8, 4096, 2, "full")          # "~15 GB (checkpointed; L 4096, B 8)"
    assert act / GB == pytest.approx(15.0, abs=0.1)
    kv = memory.kv_bytes(named(7), 256 * 4096)
    c = memory.rl_copies(7e9, 4, 1, 3, kv, act)
    assert memory.train_bytes(7e9) / 4 == 31.5e9
    assert c.trainer / GB == pytest.approx(46.5, abs=0.1)                # "≈ 47 GB/GPU"
    assert c.reference == 14e9
    # course printed "131 GB total, ~44 GB/GPU → ~58 GB/GPU": it took 256 × 4096 as 1e6 tokens; the
    # 1,048,576 tokens at 131,072 B are 137.4 GB, 45.8 GB per GPU, 59.8 GB with the weights
    assert kv / GB == pytest.approx(137.4, abs=0.05)
    assert c.rollout / GB == pytest.approx(59.8, abs=0.05)
    ppo = memory.rl_copies(7e9, 4, 1, 3, kv, act, critic=True)           # PPO's value model: one more copy
    assert ppo.trainer - c.trainer == 31.5e9


# -- lesson 22 / 28: FLOPs --------------------------------------------------------------------------------------
def test_flops_and_training_throughput():
    assert [flops.flops_per_token(1.0, m) for m in ("forward", "train", "recompute")] == [2, 6, 8]
    assert flops.train_tokens_per_sec(7e9) == pytest.approx(19_048, abs=1)       # "7 B ≈ 19k tok/s"
    assert flops.train_tokens_per_sec(70e9) == pytest.approx(1_905, abs=1)       # "70 B ≈ 1.9k"
    assert flops.train_tokens_per_sec(405e9) == pytest.approx(329, abs=1)        # "405 B ≈ 330"
    assert flops.train_tokens_per_sec(7e9, recompute=True) == pytest.approx(800e12 / 56e9)
    # lesson 28: 7 B on a 32 k packed batch is 6·P·tokens ≈ 1.3 PFLOP; course printed "≈ 1.6 s" on one H100,
    # exactly 1.72 s at 800 TFLOP/s
    f = 6 * 7e9 * 32768
    assert f == pytest.approx(1.376e15, rel=1e-3)
    assert f / flops.H100_SUSTAINED_FLOPS == pytest.approx(1.72, abs=0.005)
    # MFU of a run at the sustained rate against the dense peak: 800 / 989
    assert flops.mfu(19_047.6, 7e9, flops.H100_PEAK_FLOPS) == pytest.approx(0.809, abs=0.001)
    assert flops.mbu(1.675e12, flops.H100_HBM_BW) == 0.5


def test_decode_step_lesson_28():
    kv = 32 * 2048 * 131_072                                 # "≈ 8.6 GB" of KV at B = 32, L = 2048
    assert kv / GB == pytest.approx(8.6, abs=0.015)
    d = flops.decode_step(14e9, kv, 32, 7e9)
    # course printed "≈ 3–4k tok/s aggregate, ≈ 100 tok/s/seq"; (14 + 8.6) GB / 3.35 TB/s = 6.7 ms per step
    assert d.step_s * 1e3 == pytest.approx(6.74, abs=0.01)
    assert d.tokens_per_sec == pytest.approx(4745, abs=5)
    assert d.per_seq_tokens_per_sec == pytest.approx(148, abs=1)
    assert d.bound == "memory"
    assert flops.decode_step(14e9, 0, 4096, 7e9).bound == "compute"   # a huge batch turns decode compute-bound


# -- lesson 22a: the throughput equation ----------------------------------------------------------------------
def test_tau_step_per_topology():
    t = RoleTimes(rollout=20, train=8, sync=3)               # lesson 22c's widget defaults
    assert [t.step(x) for x in ("colocated", "disaggregated", "async")] == [31, 23, 20]
    assert 31 / 23 == pytest.approx(1.35, abs=0.005)          # "26 % faster" = 1.35× throughput
    assert 31 / 20 == 1.55                                   # async Δ = 2: "+55 %"
    assert throughput.trainer_idle(t, "disaggregated") == pytest.approx(12 / 23)   # "idles 12 s, 52 %"
    assert throughput.trainer_idle(t, "colocated") == 0
    with pytest.raises(ConfigError, match="unknown topology"):
        t.step("ring")


def test_lesson_22a_worked_example():
    t = RoleTimes(rollout=30, verify=1, ref=3, train=8, sync=1)   # 7 B, K 16, 64 prompts, 4 + 4 H100
    assert t.step("disaggregated") == 32                     # max(31, 11) + 1
    assert throughput.useful_tokens_per_sec(64, 16, 1024, 32) == pytest.approx(32_768)   # "≈ 33k tok/s"
    assert t.rollout + t.verify - (t.ref + t.train) == 20    # "the trainer is idle ~20 s per step"


def test_role_widget_defaults():
    r = throughput.role_widget()                             # 7 B, K 16, L 1024, disaggregated, B 64
    assert r.rollout == pytest.approx(10.08, abs=0.01)
    assert r.train == pytest.approx(2.097, abs=0.001)
    assert r.ref == pytest.approx(0.699, abs=0.001)
    assert r.sync == pytest.approx(1.295)
    tau = r.step("disaggregated")
    assert tau == pytest.approx(12.38, abs=0.01)
    assert throughput.useful_tokens_per_sec(64, 16, 1024, tau) == pytest.approx(84_700, abs=100)
    assert r.rollout / tau == pytest.approx(0.81, abs=0.01)
    # course: the widget's calibration (21 s, 8 s per 1 M tokens) already assumes 4 GPUs and its code divides by
    # 4 again, so it printed 12.4 s against the prose's 32 s; taken at its word (no second ÷4) it gives 42.6 s
    # (its tail factor at L = 1024 is 1.83, the prose's 1.4)
    assert throughput.role_widget(divide=1).step("disaggregated") == pytest.approx(42.6, abs=0.05)
    assert 1 + 1.8 * math.tanh(1024 / 2048) == pytest.approx(1.83, abs=0.005)
    assert throughput.role_widget(70).sync == pytest.approx(35)            # "70 B gives τ_S = 35 s"
    long = throughput.role_widget(length=8192)
    assert (long.rollout + long.verify) / long.step("disaggregated") > 0.9   # "L = 8192 pushes rollout to ≈ 98 %"
    colo = throughput.role_widget().step("colocated")
    # "colocated drops tok/s ≈ 18 %" in the widget (the prose says ~30 %)
    assert 1 - tau / colo == pytest.approx(0.18, abs=0.01)


def test_worked_7b_grpo_step_rate():
    """Lesson 22: 7 B GRPO on 8×H100: 1 M tokens of rollout at 35k tok/s ≈ 30 s, training ≈ 5 s at 200k tok/s;
    ≈ 35 s/step ≈ 100 steps/h, 1000 steps ≈ 10 h, rollout-bound (on-policy: the two do not overlap)."""
    tokens = 64 * 16 * 1024
    t = RoleTimes(rollout=tokens / 35e3, train=tokens / 200e3)
    assert t.rollout == pytest.approx(30, abs=0.05)
    assert t.step("colocated") == pytest.approx(35.2, abs=0.05)
    assert 3600 / t.step("colocated") == pytest.approx(100, abs=3)
    assert 1000 * t.step("colocated") / 3600 == pytest.approx(10, abs=0.3)
    inf, train = throughput.balance(7, tokens, 35e3 / 3, tokens, 200e3 / 4)
    assert inf + train == pytest.approx(7)
    assert inf / train == pytest.approx((tokens / (35e3 / 3)) / (tokens / 50e3))   # device-seconds of each side


# -- lesson 22b: stragglers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k,row", [(4, (2.0, 2.8, 3.7)), (16, (2.7, 5.0, 8.9)), (64, (3.5, 7.8, 17.4)),
                                   (256, (4.3, 11.3, 30.6))])
def test_max_of_k_table(k, row):
    for cv, want in zip((0.5, 1.0, 2.0), row):
        assert throughput.max_of_k(1.0, cv, k) == pytest.approx(want, abs=0.05)


def test_straggler_claims():
    assert throughput.max_of_k(1, 1, 16) == pytest.approx(5.02, abs=0.005)
    assert throughput.straggler_tax(1, 16) == pytest.approx(4.02, abs=0.005)
    # course printed "K 16 → 32 adds about 15 %"; its own formula gives +26 % at c = 1
    assert throughput.max_of_k(1, 1, 32) / throughput.max_of_k(1, 1, 16) == pytest.approx(1.26, abs=0.005)
    # "doubling c from 1 to 2 roughly doubles the max": 1.77×
    assert throughput.max_of_k(1, 2, 16) / throughput.max_of_k(1, 1, 16) == pytest.approx(1.77, abs=0.005)
    mu, cv = throughput.lognormal_params([1.0, 2.0, 3.0])
    assert (mu, cv) == (2.0, 0.5)


# -- lesson 22c: async staleness -------------------------------------------------------------------------------
def test_async_clip_fraction():
    got = [throughput.async_clip_fraction(d) for d in (2, 4, 6, 8, 12)]
    assert got == pytest.approx([0.095, 0.18, 0.26, 0.33, 0.45], abs=0.005)


# -- lesson 28: the optimisation-budget allocator ------------------------------------------------------------
def test_allocator_defaults():
    a = throughput.allocator_widget()
    assert a.baseline == 100
    assert a.total == pytest.approx(43.92)                   # "43.9 s"
    assert a.speedup == pytest.approx(2.28, abs=0.005)       # "2.28×"
    assert a.largest() == ("rollout", pytest.approx(0.33, abs=0.005))


def test_allocator_everything_on():
    a = throughput.allocator_widget(on={"speculative decoding": True, "FP8 rollout": True, "async overlap": True,
                                        "separate ref pool": True})
    assert a.total == pytest.approx(21.58, abs=0.005)        # "≈ 21.6 s (≈ 4.63×)"
    assert a.speedup == pytest.approx(4.63, abs=0.005)
    assert a.largest() == ("train", pytest.approx(0.44, abs=0.005))   # "train (9.5 s, 44 %)"
    assert a.optimised.algo == 5                             # the unoptimisable slice
    # course: sliders can sum past 100; the baseline then exceeds its "100 s" label
    assert throughput.allocator_widget(rollout=90, train=50).baseline == 155


def test_gain_of_each_ranks_the_largest_role_first():
    gains = throughput.gain_of_each(RoleTimes(rollout=60, train=20, ref=10, sync=5, algo=5))
    assert gains[0] == ("prefix caching", pytest.approx(36))
    assert dict(gains)["separate ref pool"] == 10


# -- model configs ------------------------------------------------------------------------------------------
def test_named_sizes_follow_the_widget_table():
    s = named("7b")
    assert (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.params) == (32, 4096, 32, 8, 128, 7e9)
    assert named(70) == named("70B") and named(70).n_layers == 80
    mid = named(10)                                          # between 7 B (4096, 32) and 13 B (5120, 40)
    assert (mid.d_model, mid.n_layers) == (4608, 36)
    assert named(7e9) == s
    with pytest.raises(ConfigError, match="outside"):
        named(0.5)
    with pytest.raises(ConfigError, match="unknown model size"):
        named("tiny")


def test_real_models_count_their_parameters():
    assert LLAMA8.params / 1e9 == pytest.approx(8.03, abs=0.01)
    assert LLAMA70.params / 1e9 == pytest.approx(70.55, abs=0.01)


def test_hf_config_and_gpt_mini_param_count(tmp_path):
    from rlpt.models.hf import gpt_mini_to_hf
    gpt = tiny_gpt(n_layer=3, n_head=4, n_kv_head=2, d_model=32, d_ff=64, tie_embeddings=False)
    gpt_mini_to_hf(gpt).config.to_json_file(tmp_path / "config.json")
    s = configs.from_hf_config(tmp_path)
    assert (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim) == (3, 32, 4, 2, 8)
    assert s.params == sum(p.numel() for p in gpt.parameters())
    assert configs.resolve(str(tmp_path / "config.json")) == s
    with pytest.raises(ConfigError, match="lacks 'hidden_size'"):
        configs.from_hf_config({"num_attention_heads": 4})


def test_run_folder_shape_from_checkpoint_metadata(tmp_path):
    """A run folder's model comes from its checkpoint's safetensors metadata (vocab_size included)."""
    gpt = tiny_gpt()
    meta = {"model": json.dumps(gpt.cfg.to_dict()), "format": "rlpt-checkpoint-v1"}
    header = json.dumps({"__metadata__": meta}).encode()
    ck = tmp_path / "run" / "checkpoints" / "step_00000001"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    (tmp_path / "run" / "config.yaml").write_text("model:\n  n_layer: 9\n  n_head: 2\n  d_model: 32\n  d_ff: 64\n")
    s = configs.resolve(str(tmp_path / "run"))
    assert s.params == sum(p.numel() for p in gpt.parameters())       # tied embeddings counted once
    (ck / "model.safetensors").unlink()
    assert configs.from_run(tmp_path / "run").n_layers == 9           # no checkpoint: config.yaml
    with pytest.raises(ConfigError, match="not an rlpt run folder"):
        configs.run_config(tmp_path)


def test_perf_imports_no_torch():
    code = ("import sys, rlpt.perf.memory, rlpt.perf.flops, rlpt.perf.throughput, rlpt.perf.diagnose, "
            "rlpt.perf.cli, rlpt.perf.probe; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the command line ---------------------------------------------------------------------------------------
def _cli(*argv):
    import argparse

    from rlpt.perf.cli import add_commands
    p = argparse.ArgumentParser(prog="rlpt")
    add_commands(p.add_subparsers(dest="command"))
    args = p.parse_args(list(argv))
    return args.fn(args)


def test_cli_tables(capsys):
    assert _cli("perf", "memory") == 0
    out = capsys.readouterr().out
    assert "| widget: train / GPU" in out and "32.9 GB" in out and "2.29 GB" in out and "131,072 B" in out
    assert _cli("perf", "memory", "--rl", "4:1:3", "--seq", "4096", "--batch", "8") == 0
    assert "59.8 GB" in capsys.readouterr().out                   # the worked example's rollout device
    assert _cli("perf", "kv", "--model", "llama-3-70b", "--batch", "256", "--seq", "8192") == 0
    assert "640 GiB" in capsys.readouterr().out
    assert _cli("perf", "throughput") == 0
    assert "12.4 s" in capsys.readouterr().out


# -- the per-role timeline (`rlpt perf timeline`) ----------------------------------------------------------------
def test_timeline_in_process_rows_lay_the_roles_end_to_end():
    from rlpt.perf.timeline import Span, equation, spans
    rows = [{"step": 0, "acc/heldout": 0.5},
            {"step": 1, "time/rollout": 1.0, "time/verify": 0.5, "time/ref": 0.25, "time/train": 2.0,
             "time/sync": 0.25},
            {"step": 2, "time/rollout": 2.0, "time/verify": 0.0, "time/ref": 0.5, "time/train": 1.0, "time/sync": 0.5}]
    assert spans(rows) == [Span(1, "rollout", 0.0, 1.0), Span(1, "verify", 1.0, 1.5), Span(1, "ref", 1.5, 1.75),
                           Span(1, "train", 1.75, 3.75), Span(1, "sync", 3.75, 4.0),
                           Span(2, "rollout", 4.0, 6.0), Span(2, "ref", 6.0, 6.5), Span(2, "train", 6.5, 7.5),
                           Span(2, "sync", 7.5, 8.0)]
    eq = equation(rows)   # medians of two rows: the upper one (index len // 2)
    assert (eq["rollout"], eq["verify"], eq["ref"], eq["train"], eq["sync"]) == (2.0, 0.5, 0.5, 2.0, 0.5)
    assert eq["sum"] == 5.5 and eq["max"] == max(2.0 + 0.5, 0.5 + 2.0 + 0.5) == 3.0 and eq["measured"] == 4.0


def test_timeline_ray_rows_overlap_and_steps_follow_time_step():
    from rlpt.perf.timeline import Span, spans
    row = {"step": 3, "time/train": 1.0, "time/step": 2.0,
           "timeline/rollout0_t0": 0.0, "timeline/rollout0_t1": 1.5, "timeline/rollout1_t0": 0.1,
           "timeline/rollout1_t1": 1.2, "timeline/train_t0": 0.2, "timeline/train_t1": 1.2,
           "timeline/sync_t0": 1.2, "timeline/sync_t1": 1.3}
    got = spans([row, {**row, "step": 4}], last=2)
    assert got[:4] == [Span(3, "rollout0", 0.0, 1.5), Span(3, "rollout1", 0.1, 1.2), Span(3, "sync", 1.2, 1.3),
                       Span(3, "train", 0.2, 1.2)]
    assert got[4] == Span(4, "rollout0", 2.0, 3.5)   # the second step starts at the first one's time/step


def test_rlpt_perf_timeline_writes_the_gantt(tmp_path, capsys):
    from rlpt.cli import main
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "time/rollout": 1.0, "time/verify": 0.1, "time/ref": 0.2, "time/train": 1.5,
             "time/sync": 0.1} for s in range(1, 9)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["perf", "timeline", str(run), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert (run / "timeline.png").stat().st_size > 0
    assert "equation, colocated (sum of terms)" in out and "2.9 s" in out and "1.8 s" in out
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "acc/heldout": 0.1}) + "\n")
    assert main(["perf", "timeline", str(run)]) == 2
    assert "logged no per-role times" in capsys.readouterr().err
