"""Peak memory of one trainer forward + backward at 256 tokens, with and without gradient checkpointing.

    cut = 1 − peak(checkpointed) / peak(plain)         goal: >= 0.40 at 256 tokens (issue 16)

    peak = the highest resident memory during  per_token_logp(model, ids) → loss.backward()  minus what was
           resident just before it (weights, optimizer-free: only the step's own activations, logits and grads)

What `trainer.grad_checkpointing` changes: a plain backward needs every block's intermediate activations (norms,
q k v, attention output, the SwiGLU's gate / up / product: ~10 d + 3 d_ff floats per token per block), kept from
the forward; checkpointed, each block keeps its input only (d floats per token) and recomputes the rest, one
block at a time, during backward. Each (model, variant) runs in a fresh child process with glibc's mmap threshold
fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every tensor bigger than that is its own mapping, returned to the OS
when freed: the resident set then follows the live tensors (rlpt.perf.probe.PeakMemory: VmHWM reset by
/proc/self/clear_refs). Also reported, exactly: the bytes autograd keeps for backward at the end of the forward
(saved-tensor hooks, unique storages), and the CPU seconds of the step (the recompute's cost).

    python bench/memory.py                          # gpt_mini 4 x 128 (its recipe shape, 256 positions), its HF
                                                    # export (LlamaForCausalLM) full and LoRA r 8; batch 8 x 256
    python bench/memory.py --batch 4 --seq 512 --models gpt_mini
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

MODELS = ("gpt_mini", "hf", "hf_lora")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="tokens per row (the model's max_seq_len is set to it)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=352)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--reps", type=int, default=3, help="timed steps per child (CPU time, median)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)   # "<model>:<0|1>": one measurement
    return p.parse_args(argv)


def build(args, name: str):
    from rlpt.gpt_mini.model import GPT, GPTConfig
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=CharTokenizer().vocab_size, n_layer=args.n_layer, d_model=args.d_model,
                    d_ff=args.d_ff, max_seq_len=args.seq)
    model = GPT(cfg)
    if name == "gpt_mini":
        return model
    from rlpt.models.hf import HFPolicy, gpt_mini_to_hf
    policy = HFPolicy(gpt_mini_to_hf(model))
    if name == "hf_lora":
        from rlpt.models.lora import LoraSpec, apply_lora
        policy = apply_lora(policy, LoraSpec(r=8, alpha=16))
    return policy


def saved_bytes(model, ids) -> int:
    """Bytes autograd holds for backward when the forward ends (unique storages)."""
    from rlpt.framework.trajectory import per_token_logp
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp = per_token_logp(model, ids)
    n = sum(seen.values())
    del logp
    return n


def child(args) -> dict:
    """One (model, checkpointing) measurement, in this fresh process."""
    import gc

    from rlpt.framework.trajectory import per_token_logp
    from rlpt.hf_policy import set_grad_checkpointing
    from rlpt.perf.probe import PeakMemory
    torch.set_num_threads(1)
    name, ckpt = args.child.split(":")
    model = build(args, name)
    set_grad_checkpointing(model, ckpt == "1")
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.cfg.vocab_size, (args.batch, args.seq), generator=g)
    weights = torch.linspace(-1, 1, args.seq - 1)

    def step():
        logp = per_token_logp(model, ids)
        (-(logp * weights).mean()).backward()

    step()                                         # warm-up: kernels, allocator, lazy buffers
    peaks, cpu = [], []
    for _ in range(args.reps):
        model.zero_grad(set_to_none=True)
        gc.collect()
        t = time.process_time()
        with PeakMemory() as pm:
            step()
        cpu.append(time.process_time() - t)
        peaks.append(pm.peak_bytes - pm.start_bytes)
    model.zero_grad(set_to_none=True)
    return {"model": name, "grad_checkpointing": ckpt == "1", "peak_bytes": min(peaks), "peaks": peaks,
            "source": pm.source, "saved_bytes": saved_bytes(model, ids), "cpu_s": statistics.median(cpu),
            "params": sum(p.numel() for p in model.parameters())}


def run_child(argv: list[str], spec: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, *argv, "--child", spec], env=env, capture_output=True, text=True,
                         check=False)
    if out.returncode:
        raise RuntimeError(f"child {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"--models: unknown {bad}; pick from {', '.join(MODELS)}")
    rows = {m: {ck: run_child(argv, f"{m}:{int(ck)}") for ck in (False, True)} for m in models}
    print(f"Peak memory of one forward + backward (per_token_logp, weighted mean loss): {args.n_layer} x "
          f"{args.d_model} (d_ff {args.d_ff}), batch {args.batch} x {args.seq} tokens, 1 thread, fp32; "
          f"peak = {rows[models[0]][False]['source']} rise during the step (min of {args.reps})")
    print(f"| {'model':<9} | {'plain MB':>9} | {'ckpt MB':>9} | {'cut':>6} | {'saved plain MB':>14} | "
          f"{'saved ckpt MB':>13} | {'CPU s plain':>11} | {'CPU s ckpt':>10} |")
    print(f"|{'-' * 11}|{'-' * 10}:|{'-' * 10}:|{'-' * 7}:|{'-' * 15}:|{'-' * 14}:|{'-' * 12}:|{'-' * 11}:|")
    summary = {}
    for m in models:
        p, c = rows[m][False], rows[m][True]
        cut = 1 - c["peak_bytes"] / p["peak_bytes"]
        summary[m] = {"peak_mb_plain": round(p["peak_bytes"] / 1e6, 2), "peak_mb_ckpt": round(c["peak_bytes"] / 1e6, 2),
                      "cut": round(cut, 4), "saved_mb_plain": round(p["saved_bytes"] / 1e6, 2),
                      "saved_mb_ckpt": round(c["saved_bytes"] / 1e6, 2), "cpu_s_plain": round(p["cpu_s"], 3),
                      "cpu_s_ckpt": round(c["cpu_s"], 3)}
        s = summary[m]
        print(f"| {m:<9} | {s['peak_mb_plain']:>9.1f} | {s['peak_mb_ckpt']:>9.1f} | {cut:>6.1%} | "
              f"{s['saved_mb_plain']:>14.1f} | {s['saved_mb_ckpt']:>13.1f} | {s['cpu_s_plain']:>11.3f} | "
              f"{s['cpu_s_ckpt']:>10.3f} |")
    worst = min(s["cut"] for s in summary.values())
    print(f"smallest cut {worst:.1%} (goal >= 40%); load average {os.getloadavg()[0]:.1f}")
    print(json.dumps({"bench": "memory", "batch": args.batch, "seq": args.seq, "n_layer": args.n_layer,
                      "d_model": args.d_model, "d_ff": args.d_ff, "models": summary, "min_cut": worst, "goal": 0.40,
                      "load_avg": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
