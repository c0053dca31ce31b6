#!/usr/bin/env bash
# bench/gpu_check.sh: bf16 + LoRA + gradient-checkpointing GRPO steps on a random-initialised ~0.5 B Llama, on
# one GPU, in at most 8 minutes (issue 16). Reports the card, tokens/s and peak memory per role (rollout, ref,
# train, sync), the bf16-trainer vs fp32-rollout log-prob gap, and fwd + bwd with bf16 / fp32 and checkpointing
# on / off side by side. The last line is one JSON object (also written to $OUT/gpu_check.json when $OUT is set).
#
#   bench/gpu_check.sh                # on a CUDA machine: 24 x 1024 Llama (GQA 16/4, d_ff 4864, vocab 32000)
#   bench/gpu_check.sh --dry-run      # a tiny config on the CPU, one step: checks the script end to end
#   PYTHON=/path/to/python bench/gpu_check.sh     # default: .venv/bin/python if present, else python3
#   bench/gpu_check.sh --steps 5 --prompts 16 --k 8 --max-tokens 256
#
# One GRPO step, rlpt's pieces where they are device-agnostic:
#   rollout  rlpt.engine (paged KV; the LoRA delta merged into its fused weights) samples K responses per random
#            prompt from the rollout copy (rlpt.models.lora.rollout_copy: frozen base shared, own adapters), fp32;
#            falls back to rlpt.gpt_mini.generate (dense KV) if the engine fails here, and says so
#   reward   the share of even token ids in a response (a verifier-free signal, so groups differ)
#   ref      π_ref = AdapterDisabled(policy): the same weights, adapters off, bf16 autocast, no grad
#   train    GRPO (group-normalised advantages, clipped surrogate, k3 KL β 0.04, token mean) under bf16 autocast,
#            fp32 master weights and AdamW on the adapters only, gradient checkpointing on (use_reentrant=False)
#   sync     WeightSyncer(payload=adapter_payload): the adapters only, into the rollout copy (bytes reported)
#   vllm     optional, only where `import vllm` works (make test-vllm's .venv-vllm: PYTHON=.venv-vllm/bin/python):
#            the same rollout through rollout.backend=vllm (rlpt/engine/vllm_backend.py, fp32, eager): engine
#            start, tokens/s, one full weight push (reload_weights), its log-probs against the trainer's fp32;
#            its result is "vllm" in the JSON (ran: false and why, where it did not run). --no-vllm skips it.
# Needs torch, transformers, peft, pydantic, pyyaml; rlpt from this checkout (PYTHONPATH), no install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
exec timeout "${GPU_CHECK_TIMEOUT:-470}" "$PY" - "$@" <<'PYTHON'
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

p = argparse.ArgumentParser(prog="bench/gpu_check.sh")
p.add_argument("--dry-run", action="store_true", help="a tiny config on the CPU, one step, no warm-up")
p.add_argument("--steps", type=int, default=3, help="timed GRPO steps (after one warm-up step)")
p.add_argument("--prompts", type=int, default=8)
p.add_argument("--k", type=int, default=8, help="samples per prompt")
p.add_argument("--prompt-len", type=int, default=64)
p.add_argument("--max-tokens", type=int, default=128)
p.add_argument("--lora-r", type=int, default=16)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--no-vllm", action="store_true", help="skip the optional rollout.backend=vllm step")
args = p.parse_args(sys.argv[1:])
if args.dry_run:
    args.steps, args.prompts, args.k, args.prompt_len, args.max_tokens, args.lora_r = 0, 2, 2, 6, 6, 4

if not args.dry_run and not torch.cuda.is_available():
    sys.exit("bench/gpu_check.sh: no CUDA device here; run it on a GPU machine, or `bench/gpu_check.sh --dry-run` "
             "for the tiny CPU version")
device = torch.device("cpu" if args.dry_run else "cuda")
torch.manual_seed(args.seed)
t_start = time.time()

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from rlpt.framework.trajectory import Trajectory, collate, per_token_logp  # noqa: E402
from rlpt.framework.weight_sync import WeightSyncer  # noqa: E402
from rlpt.gpt_mini.generate import SamplingParams, generate  # noqa: E402
from rlpt.models.hf import HFPolicy  # noqa: E402
from rlpt.models.lora import AdapterDisabled, LoraSpec, adapter_payload, apply_lora, rollout_copy  # noqa: E402
from rlpt.perf.probe import PeakMemory  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4864, num_hidden_layers=24,
             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
if args.dry_run:
    SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
EOS, PAD = 2, 0
config = LlamaConfig(**SHAPE, tie_word_embeddings=False, rope_theta=10000.0, attention_dropout=0.0, hidden_act="silu",
                     bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, attn_implementation="sdpa")
with torch.device(device):
    hf = LlamaForCausalLM(config)                      # fp32 master weights, random init
n_params = sum(p.numel() for p in hf.parameters())
policy = apply_lora(HFPolicy(hf), LoraSpec(r=args.lora_r, alpha=2 * args.lora_r))
policy.set_grad_checkpointing(True)
ref = AdapterDisabled(policy)
rollout_model = rollout_copy(policy, "adapters")       # frozen base shared, its own A, B
trainable = [p for p in policy.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
syncer = WeightSyncer(1, adapter_payload)
sp = SamplingParams(max_tokens=args.max_tokens, temperature=1.0)
BF16 = torch.autocast(device.type, dtype=torch.bfloat16)
card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)"
print(f"[gpu_check] {card}; torch {torch.__version__}; Llama {n_params / 1e6:.1f} M params, LoRA r {args.lora_r} "
      f"({sum(p.numel() for p in trainable) / 1e6:.2f} M trainable); {args.prompts} prompts x {args.k}, "
      f"{args.prompt_len} + {args.max_tokens} tokens", flush=True)

sampler = {"name": "engine", "error": None}
try:
    from rlpt.engine.backend import EngineBackend
    kv = (256 << 20) if args.dry_run else (8 << 30)
    engine = EngineBackend(max_num_seqs=256, kv_cache_bytes=kv, max_model_len=args.prompt_len + args.max_tokens)
except Exception as e:   # e.g. a missing dependency on this machine: the dense sampler still runs the step
    engine, sampler = None, {"name": "simple", "error": f"{type(e).__name__}: {e}"}


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def sample(prompts):
    global engine
    if engine is not None:
        try:
            return engine(rollout_model, prompts, sp, EOS, PAD, torch.Generator().manual_seed(len(prompts)))
        except Exception as e:
            print(f"[gpu_check] engine failed ({type(e).__name__}: {e}); falling back to the dense sampler",
                  flush=True)
            engine, sampler["name"], sampler["error"] = None, "simple", f"{type(e).__name__}: {e}"
    return generate(rollout_model, prompts, sp, EOS, PAD, None)


def timed(role, fn, metrics):
    sync()
    t = time.perf_counter()
    with PeakMemory() as pm:
        out = fn()
        sync()
    metrics[f"time/{role}"] = time.perf_counter() - t
    metrics[f"mem/{role}_gb"] = pm.peak_bytes / 1e9
    return out


def to_device(batch):
    for name, v in vars(batch).items():
        if isinstance(v, torch.Tensor):
            setattr(batch, name, v.to(device))
    return batch


def grpo_loss(batch, new_logp, ref_logp, eps=0.2, beta=0.04):
    ratio = (new_logp - batch.old_logp).exp()
    surrogate = torch.minimum(ratio * batch.advantage, ratio.clamp(1 - eps, 1 + eps) * batch.advantage)
    d = ref_logp - new_logp
    kl = d.exp() - d - 1                                             # k3 estimator of KL(π ‖ π_ref)
    return -((surrogate - beta * kl) * batch.mask).sum() / batch.mask.sum()


g = torch.Generator().manual_seed(args.seed)


def step(metrics):
    prompts = [torch.randint(3, config.vocab_size, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.prompts)]
    samples = timed("rollout", lambda: sample([q for q in prompts for _ in range(args.k)]), metrics)
    trajs = []
    for i, s in enumerate(samples):
        toks = s.tokens or [EOS]
        reward = sum(t % 2 == 0 for t in toks) / len(toks)
        trajs.append(Trajectory(prompt_ids=prompts[i // args.k], response_ids=toks,
                                response_mask=torch.ones(len(toks)), old_logp=torch.tensor(s.logps or [0.0]),
                                reward=reward, group=i // args.k))
    for b in range(args.prompts):                                     # GRPO: A = (r − mean_group) / (std + 1e-4)
        grp = trajs[b * args.k:(b + 1) * args.k]
        rs = torch.tensor([t.reward for t in grp])
        for t, a in zip(grp, ((rs - rs.mean()) / (rs.std() + 1e-4)).tolist()):
            t.advantage = a
    batch = to_device(collate(trajs, PAD))
    metrics["tokens/rollout"] = sum(len(s.tokens) for s in samples)
    metrics["tokens/batch"] = int(batch.input_ids.numel())

    def score_ref():
        with torch.no_grad(), BF16:
            return per_token_logp(ref, batch.input_ids).float()
    ref_logp = timed("ref", score_ref, metrics)

    def train():
        policy.train()
        with BF16:
            new_logp = per_token_logp(policy, batch.input_ids)
        loss = grpo_loss(batch, new_logp.float(), ref_logp)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        gap = (new_logp.detach().float() - batch.old_logp).abs()[batch.mask > 0]
        return loss.item(), gn.item(), gap.mean().item(), gap.max().item()
    metrics["loss"], metrics["grad/norm"], metrics["check/logp_mismatch_mean"], metrics["check/logp_mismatch"] = \
        timed("train", train, metrics)
    timed("sync", lambda: syncer.sync(type("T", (), {"model": policy, "version": 1})(),
                                      type("R", (), {"model": rollout_model, "version": 0})()), metrics)
    metrics["sync/bytes"] = syncer.bytes_last
    return batch, ref_logp


rows = []
batch = ref_logp = None
for i in range(args.steps + 1):                                      # step 0 warms up kernels and allocator
    m = {}
    batch, ref_logp = step(m)
    m["step"] = i
    rows.append(m)
    print(f"[gpu_check] step {i}: " + " ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)),
          flush=True)
timed_rows = rows[1:] or rows


def med(key):
    return statistics.median(r[key] for r in timed_rows)


roles = {}
for role, tokens in (("rollout", "tokens/rollout"), ("ref", "tokens/batch"), ("train", "tokens/batch"),
                     ("sync", None)):
    t = med(f"time/{role}")
    roles[role] = {"s": round(t, 4), "peak_gb": round(max(r[f"mem/{role}_gb"] for r in timed_rows), 3),
                   "tokens_per_s": round(med(tokens) / t, 1) if tokens else None}

# fwd + bwd of the last batch, bf16 / fp32 x checkpointing on / off (no optimizer step: the weights stay)
variants = {}
for precision in ("bf16", "fp32"):
    for ckpt in (True, False):
        policy.set_grad_checkpointing(ckpt)
        policy.train()
        m = {}

        def fwd_bwd():
            with (BF16 if precision == "bf16" else torch.autocast(device.type, enabled=False)):
                lp = per_token_logp(policy, batch.input_ids)
            grpo_loss(batch, lp.float(), ref_logp).backward()
            opt.zero_grad(set_to_none=True)
        if not args.dry_run:
            fwd_bwd()                                                # warm-up
        timed("v", fwd_bwd, m)
        variants[f"{precision}{'+ckpt' if ckpt else ''}"] = {
            "s": round(m["time/v"], 4), "peak_gb": round(m["mem/v_gb"], 3),
            "tokens_per_s": round(batch.input_ids.numel() / m["time/v"], 1)}
policy.set_grad_checkpointing(True)

print(f"| role | s / step | tokens/s | peak GB |")
print(f"|---|---:|---:|---:|")
for role, r in roles.items():
    print(f"| {role} | {r['s']:.3f} | {r['tokens_per_s'] or '-'} | {r['peak_gb']:.2f} |")
print(f"| fwd+bwd variant | s | tokens/s | peak GB |")
print(f"|---|---:|---:|---:|")
for name, r in variants.items():
    print(f"| {name} | {r['s']:.3f} | {r['tokens_per_s']} | {r['peak_gb']:.2f} |")


def vllm_step() -> dict:
    """The optional vLLM rollout (see the header); never fails the script: an error is reported in the result."""
    if args.no_vllm:
        return {"ran": False, "why": "--no-vllm"}
    left = float(os.environ.get("GPU_CHECK_TIMEOUT", 470)) - (time.time() - t_start)
    if left < 150:
        return {"ran": False, "why": f"only {left:.0f} s of the time limit left"}
    try:
        import vllm
    except Exception as e:                       # not installed (the default), or a broken install
        return {"ran": False, "why": f"vllm not importable ({type(e).__name__}: {e})"[:300]}
    out = {"ran": True, "version": getattr(vllm, "__version__", "?")}
    try:
        from rlpt.engine.vllm_backend import VLLMBackend, shutdown_engines
        prompts = [torch.randint(3, config.vocab_size, (args.prompt_len,), generator=g).tolist()
                   for _ in range(args.prompts)]
        batch_prompts = [q for q in prompts for _ in range(args.k)]
        backend = VLLMBackend(dtype="float32", enforce_eager=True, max_model_len=args.prompt_len + args.max_tokens)
        t = time.perf_counter()
        backend(rollout_model, prompts[:1], sp, EOS, PAD, torch.Generator().manual_seed(0))   # start + warm-up
        out["start_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        samples = backend(rollout_model, batch_prompts, sp, EOS, PAD, torch.Generator().manual_seed(1))
        dt = time.perf_counter() - t
        out["rollout_s"] = round(dt, 3)
        out["tokens_per_s"] = round(sum(len(s.tokens) for s in samples) / dt, 1)
        gaps = []                                # vLLM's processed log-probs vs the trainer's fp32 forward
        with torch.no_grad():
            for q, s in list(zip(batch_prompts, samples))[:8]:
                if s.tokens:
                    ids = torch.tensor([q + s.tokens], device=device)
                    lp = per_token_logp(rollout_model, ids, sp.temperature)[0, len(q) - 1:].float().cpu()
                    gaps.append((lp - torch.tensor(s.logps)).abs())
        if gaps:
            gap = torch.cat(gaps)
            out["logp_mismatch_mean"], out["logp_mismatch_max"] = gap.mean().item(), gap.max().item()
        with torch.no_grad():                    # an in-place touch (values unchanged) => one full weight push
            next(rollout_model.parameters()).mul_(1.0)
        t = time.perf_counter()
        served = backend.engine(rollout_model)
        out["reload_s"], out["reloads"] = round(time.perf_counter() - t, 3), served.reloads
        shutdown_engines()
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    return out


vllm_result = vllm_step()
print(f"[gpu_check] vllm: {json.dumps(vllm_result)}", flush=True)
result = {"bench": "gpu_check", "card": card, "device": device.type, "dry_run": args.dry_run,
          "torch": torch.__version__, "params": n_params, "trainable": sum(p.numel() for p in trainable),
          "shape": SHAPE, "prompts": args.prompts, "k": args.k, "prompt_len": args.prompt_len,
          "max_tokens": args.max_tokens, "steps": args.steps, "sampler": sampler, "roles": roles,
          "fwd_bwd": variants, "sync_bytes": rows[-1]["sync/bytes"],
          "logp_mismatch_mean": med("check/logp_mismatch_mean"), "logp_mismatch_max": med("check/logp_mismatch"),
          "loss_finite": all(math.isfinite(r["loss"]) for r in rows), "vllm": vllm_result, "wall_s": round(time.time() - t_start, 1)}
line = json.dumps(result)
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
        f.write(line + "\n")
print(line)
PYTHON
