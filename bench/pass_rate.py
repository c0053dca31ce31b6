"""Pass rates of 2,000 arithmetic prompts at K = 8 through the engine (lesson 18a, stage 5): seconds and tokens.

    p̂(x) = (1/K) Σ_i verify(x, y_i)      one engine request per prompt with n = K (prefill once, fork the KV)

The measured side is `rlpt.data.difficulty.pass_rates`, what `rlpt data curate` runs. The baseline, in the same
process on the first `--baseline` prompts, sends the same K samples as K requests of n = 1 (each prefills its
own copy of the prompt); the prefix cache is reset between the two sides. Issue 18's target: 2,000 prompts
at K = 8 in <= 60 s on the project's 2-core machine.

    python bench/pass_rate.py                                     # a fresh gpt_mini 4 x 128: every sample runs
                                                                  # to --max-tokens (an upper bound of the work)
    python bench/pass_rate.py --policy runs/sft_cot --max-tokens 24    # a trained CoT policy
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from rlpt.config import ModelConfig, TaskConfig
from rlpt.data.difficulty import pass_rates
from rlpt.data.prompts import PromptRow
from rlpt.data.signal import wasted_fraction
from rlpt.engine.llm import LLM
from rlpt.engine.sampling import SamplingParams
from rlpt.framework.environment import ArithmeticEnv
from rlpt.gpt_mini.model import load_model, make_model
from rlpt.gpt_mini.task import make_task
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.report import machine, table


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", default=None, help="checkpoint or run folder (default: a fresh gpt_mini, seed 0)")
    p.add_argument("--prompts", type=int, default=2000)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--baseline", type=int, default=200, help="prompts the n=1 baseline runs (0 = none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 on a shared 2-core box: spin-waits)")
    return p.parse_args()


def arith_rows(n: int, seed: int = 0) -> list[PromptRow]:
    """`n` distinct training prompts of the default task (2-4 operands, 0..9): what make-arith writes."""
    task, rng, seen, rows = make_task(TaskConfig()), random.Random(seed), set(), []
    while len(rows) < n:
        p = task.sample(rng, "train")
        if p not in seen:
            seen.add(p)
            rows.append(PromptRow(f"a{len(rows)}", p.prompt, str(p.gold)))
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = load_model(args.policy) if args.policy else make_model(ModelConfig(), tok)
    model.eval()
    rows, env = arith_rows(args.prompts), ArithmeticEnv(tokenizer=tok)
    llm = LLM(model, tok, seed=0)
    before = llm.metrics()
    t0 = time.perf_counter()
    rates = pass_rates(llm, env, rows, args.k, 1.0, args.max_tokens, seed=0, gold=int)
    seconds = time.perf_counter() - t0
    after = llm.metrics()
    generated = after["tokens/generated"] - before.get("tokens/generated", 0)
    shared = after.get("tokens/shared_by_fork", 0) - before.get("tokens/shared_by_fork", 0)
    base_s = None
    if args.baseline:
        sub = rows[:args.baseline]
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        llm.generate([r.prompt for r in sub for _ in range(args.k)],
                     [SamplingParams(n=1, temperature=1.0, max_tokens=args.max_tokens, seed=i)
                      for i in range(len(sub) * args.k)])
        base_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        llm.reset_prefix_cache()
        pass_rates(llm, env, sub, args.k, 1.0, args.max_tokens, seed=1, gold=int)
        fork_s = time.perf_counter() - t0
    ps = [r.p_hat for r in rates]
    out = {"bench": "pass_rate", "policy": args.policy or "fresh gpt_mini 4x128", "prompts": len(rows), "k": args.k,
           "max_tokens": args.max_tokens, "seconds": round(seconds, 2), "tokens_generated": generated,
           "tokens_per_s": round(generated / seconds), "tokens_shared_by_fork": shared,
           "mean_p_hat": round(sum(ps) / len(ps), 4),
           "degenerate_frac": round(sum(p in (0, 1) for p in ps) / len(ps), 4),
           "compute_wasted": round(wasted_fraction(ps, args.k), 4), "target_s": 60, "machine": machine()}
    if base_s is not None:
        out |= {"baseline_prompts": args.baseline, "baseline_n1_s": round(base_s, 2), "fork_nk_s": round(fork_s, 2)}
    print(table([(k, str(v)) for k, v in out.items() if k != "bench"]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
