"""Causal attention on a CPU: PyTorch's flash kernel against two matmuls + a softmax (rlpt.gpt_mini.attention).

    1. the kernel alone    forward + backward of causal attention on (R, H, T, hd) in fp32, R = 64 rows of gpt_mini's
                           4 heads x 32 (R = 8 from T = 128 on), flash (F.scaled_dot_product_attention, is_causal)
                           against causal_math; alternating, medians
    2. the trainer step    Trainer.train_step with GRPO's loss on the recipe's model (4 x 128) and a batch of 64
                           rows of --seq tokens, fp32 and bf16 autocast, with attention.MATH_MAX_T = 0 (flash
                           always, the default) against 64: same weights, same batch, alternating, CPU-time medians

    python bench/attention.py                 # ~1 min; one JSON line last

What it decides: MATH_MAX_T, the longest causal row the matmul path takes (docs/performance.md).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lengths", default="16,32,48,64,96,128,256", help="T of the kernel comparison")
    p.add_argument("--reps", type=int, default=15, help="timed calls per side and T (alternating)")
    p.add_argument("--seq", type=int, default=40, help="tokens per row of the trainer step")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds of the trainer step A/B")
    p.add_argument("--steps", type=int, default=5, help="train steps per side per round")
    return p.parse_args()


def kernel(T: int, reps: int) -> dict:
    from rlpt.gpt_mini.attention import causal_math
    R, H, hd = (64 if T <= 64 else 8), 4, 32
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(R, H, T, hd, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(R, H, T, hd, generator=g)
    sides = {"flash": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
             "math": lambda: causal_math(q, k, v)}
    with torch.no_grad():
        diff = float((sides["flash"]() - sides["math"]()).abs().max())
    times = {n: [] for n in sides}
    for i in range(reps + 3):
        for name in (list(sides) if i % 2 else list(sides)[::-1]):
            t = time.perf_counter()
            sides[name]().backward(grad)
            if i >= 3:
                times[name].append(time.perf_counter() - t)
    ms = {n: statistics.median(ts) * 1e3 for n, ts in times.items()}
    return {"T": T, "rows": R, "flash_ms": round(ms["flash"], 3), "math_ms": round(ms["math"], 3),
            "flash_over_math": round(ms["flash"] / ms["math"], 3), "max_abs_diff": diff}


def train_step(args) -> dict:
    """The trainer step A/B (module doc), on bench/train_throughput.py's synthetic RL batch."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import rl_batch

    import rlpt.algorithms  # noqa: F401 - registers grpo
    import rlpt.gpt_mini.attention as attn
    from rlpt.config import ModelConfig, OptimConfig
    from rlpt.framework.algorithm import make_algorithm
    from rlpt.framework.trainer import Trainer, autocast
    from rlpt.framework.trajectory import per_token_logp
    from rlpt.gpt_mini.model import make_model
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.optim import make_optimizer
    tok = CharTokenizer()
    torch.manual_seed(0)
    base = make_model(ModelConfig(), tok)
    shape = argparse.Namespace(rows=64, seq=args.seq, response=args.seq * 2 // 3)
    batch = rl_batch(shape, tok.vocab_size, torch.Generator().manual_seed(0))
    with torch.no_grad():
        batch.old_logp = per_token_logp(base, batch.input_ids) * batch.mask      # on-policy: ρ = 1
    algo = make_algorithm({"name": "grpo"}, 8, shape.response)
    with torch.no_grad():
        reference = per_token_logp(base, batch.input_ids)                            # fp32, flash
    defaults = attn.MATH_MAX_T, attn.BF16_MATH_MAX_T
    out = {}
    for precision, knob in (("fp32", "MATH_MAX_T"), ("bf16", "BF16_MATH_MAX_T")):
        sides = {}
        for name in ("flash", "math"):
            model = copy.deepcopy(base)
            opt, sched = make_optimizer(model, OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant"), 10 ** 6)
            sides[name] = Trainer(model, opt, sched, 1.0, 0, 1, 1, precision=precision)
        gap = {}
        for name in sides:                          # |log π - log π_fp32,flash| on the trained tokens, at the start
            setattr(attn, knob, 64 if name == "math" else 0)
            with torch.no_grad(), autocast(precision):
                lp = per_token_logp(base, batch.input_ids).float()
            gap[name] = ((lp - reference).abs() * batch.mask).sum().item() / batch.mask.sum().item()
        times = {n: [] for n in sides}
        for r in range(args.rounds + 1):                 # round 0 warms up
            for name in (list(sides) if r % 2 else list(sides)[::-1]):
                setattr(attn, knob, 64 if name == "math" else 0)
                c = time.process_time()
                for _ in range(args.steps):
                    sides[name].train_step(batch, algo.compute_loss)
                if r:
                    times[name].append((time.process_time() - c) / args.steps)
        attn.MATH_MAX_T, attn.BF16_MATH_MAX_T = defaults
        ms = {n: statistics.median(ts) * 1e3 for n, ts in times.items()}
        out[precision] = {"flash_ms": round(ms["flash"], 2), "math_ms": round(ms["math"], 2),
                          "flash_over_math": round(ms["flash"] / ms["math"], 3),
                          "mean_abs_dlogp_flash": gap["flash"], "mean_abs_dlogp_math": gap["math"]}
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from rlpt.report import machine
    rows = [kernel(int(T), args.reps) for T in args.lengths.split(",")]
    print(f"Measured on {machine()}\n\n| T | rows | flash ms | math ms | flash / math | max |Δ| |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['T']} | {r['rows']} | {r['flash_ms']} | {r['math_ms']} | {r['flash_over_math']} | "
              f"{r['max_abs_diff']:.1e} |")
    step = train_step(args)
    print(f"\nTrainer.train_step, 64 rows x {args.seq} tokens, CPU ms (flash: MATH_MAX_T / BF16_MATH_MAX_T = 0, "
          "fp32 attention; math: 64, in the step's precision):")
    for precision, s in step.items():
        print(f"  {precision}: flash {s['flash_ms']} ms, math {s['math_ms']} ms, {s['flash_over_math']}x; mean |dlogp| "
              f"against fp32 flash: {s['mean_abs_dlogp_flash']:.1e} flash, {s['mean_abs_dlogp_math']:.1e} math")
    print(json.dumps({"bench": "attention", "threads": args.threads, "kernel": rows, "train_step": step}))


if __name__ == "__main__":
    main()
