"""The verifier dispatcher (lesson 28) with the code sandbox as verifier: a rollout step with verification inline
after sampling (today's default) against the same step with each sequence handed to a pool of verifier processes
the moment the engine finishes it, measured side by side in one run.

    env:      arithmetic prompts (gpt_mini can write them); each response runs as a Python program in a fresh
              code-sandbox jail (rlpt/envs/code_sandbox.py: bubblewrap, seccomp, a cgroup; ~0.1–0.2 s a run here,
              mostly waiting on the kernel to build and tear down the jail), one hidden test: print the sum
    policy:   gpt_mini, random init at --d-model / --layers (sized so sampling and verifying take comparable time),
              B = --prompts × K = --k samples of up to --max-tokens at temperature 1, the paged engine with
              --batch-limit sequences decoded together (the rest wait: sequences finish in waves, and a random
              policy's lengths spread too, so there is something to overlap)
    inline    Rollout(verify_workers=0): τ_step = τ_gen + τ_verify (one after the other)
    pool      the same responses verified in the pool of W workers with nothing else running: τ_verify(W)
    dispatch  Rollout(verify_workers=W): sampling and verification overlap; the bar is
              τ_step ≤ 1.1 · max(τ_gen, τ_verify(W)), against their sum τ_gen + τ_verify(W)
    Measured round by round (one warm-up round, then --steps), each round running inline, then each W dispatched
    and alone, so the machine's changing load hits every mode of a round alike; every mode draws the same prompts
    and samples from the same seeds (the script checks that the rewards match); ratios per round, then medians.

    python bench/dispatch.py [--workers 1,4] [--steps 3] [--prompts 4] [--k 8] [--max-tokens 32] [--batch-limit 4]

Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import torch

from rlpt.envs.code_sandbox import Limits, extract_code, run_program
from rlpt.framework.dispatch import VerifierPool
from rlpt.framework.environment import ArithmeticEnv, Prompt, Verdict
from rlpt.framework.rollout import Rollout
from rlpt.gpt_mini.generate import SamplingParams
from rlpt.gpt_mini.model import GPT, GPTConfig
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.report import machine


class SandboxedArithmetic(ArithmeticEnv):
    """Arithmetic prompts whose responses the code sandbox judges: the response is the program, the hidden test
    expects the sum on stdout. Stateless verify (the gold travels in the prompt), so a pool's copies agree."""

    def __init__(self, seed: int = 0, tokenizer=None, jail: bool = True, wait_s: float = 0.0):
        super().__init__(seed=seed, tokenizer=tokenizer)
        self.limits = Limits(wall_s=5.0, verify_wall_s=8.0)
        self.jail = jail          # False: no jail run at all (the control: a verifier that only waits)
        self.wait_s = wait_s      # > 0: a remote sandbox service's or a judge's round trip on top (no CPU here)

    def verify(self, prompt: Prompt, response: str) -> Verdict:
        time.sleep(self.wait_s)
        if not self.jail:
            return super().verify(prompt, response)
        r = run_program(extract_code(response), "", self.limits)
        ok = r.status == "ok" and r.stdout.strip() == str(prompt.gold)
        return Verdict(float(ok), {"correct": ok, "sandbox_status": r.status, "sandbox_wall_s": r.wall_s})


def rollout(args, workers: int) -> Rollout:
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=args.layers, d_model=args.d_model,
                          d_ff=args.d_model * 11 // 4, max_seq_len=64)).eval()
    r = Rollout(model, tok, args.prompts, SamplingParams(max_tokens=args.max_tokens, temperature=1.0), seed=0,
                batch_limit=args.batch_limit)
    r.use_verifier(workers, timeout=30.0)
    return r


def verify_alone(pool: VerifierPool, groups: list) -> float:
    """Seconds to verify one step's responses in `pool` with nothing else running."""
    tok = CharTokenizer()
    trajs = [t for g in groups for t in g]
    t0 = time.perf_counter()
    for i, t in enumerate(trajs):
        gold = sum(int(x) for x in re.findall(r"[+-]?\d+", t.info["prompt"]))     # "<3+4-2>" -> 5
        pool.submit(i, Prompt(t.info["prompt"], list(t.prompt_ids), gold), tok.decode(t.response_ids))
    pool.gather(range(len(trajs)))
    return time.perf_counter() - t0


def measure(args, sizes: list[int], jail: bool, wait_s: float) -> tuple[list[dict], float]:
    """Round by round (one warm-up round, then --steps): the inline step, then for each pool size W the
    dispatched step and the pool verifying the inline step's responses alone. Paired in time, so the machine's
    changing load hits every mode of a round alike. Every mode draws the same prompts and samples (same seeds)."""
    env = lambda: SandboxedArithmetic(seed=1, tokenizer=CharTokenizer(), jail=jail, wait_s=wait_s)   # noqa: E731
    modes = {0: (rollout(args, 0), env())} | {w: (rollout(args, w), env()) for w in sizes}
    alone = {w: VerifierPool(env(), w, timeout=30.0) for w in sizes}
    rounds, lengths = [], []
    try:
        for i in range(args.steps + 1):
            row = {}
            for w, (r, e) in modes.items():
                t0 = time.perf_counter()
                groups = r.generate(e, args.k)
                row[w] = {"step": time.perf_counter() - t0, "gen": r.stats["time/generate"],
                          "tail": r.stats["time/verify"], "timeouts": r.stats.get("verify/timeouts", 0.0),
                          "rewards": [t.reward for g in groups for t in g]}
                if w == 0:
                    inline_groups = groups
                    lengths += [len(t.response_ids) for g in groups for t in g]
                elif row[w]["rewards"] != row[0]["rewards"]:
                    raise SystemExit(f"the pool's rewards differ from inline's (W={w}): the dispatcher is broken")
            for w, pool in alone.items():
                row[w]["verify_alone"] = verify_alone(pool, inline_groups)
            if i:                                         # round 0 warms the engines and the pools up
                rounds.append(row)
    finally:
        for r, _ in modes.values():
            r.close()
        for pool in alone.values():
            pool.close()
    return rounds, statistics.mean(lengths)


def scenario(args, sizes: list[int], jail: bool, wait_s: float) -> tuple[dict, list[dict], float]:
    """One verifier setting: the inline medians, one result row per pool size, the mean response length."""
    rounds, mean_len = measure(args, sizes, jail, wait_s)
    med = statistics.median
    inline = {"step": med(r[0]["step"] for r in rounds), "generate": med(r[0]["gen"] for r in rounds),
              "verify": med(r[0]["tail"] for r in rounds)}
    results = []
    for w in sizes:
        per = [{"max": max(r[0]["gen"], r[w]["verify_alone"]), "sum": r[0]["gen"] + r[w]["verify_alone"],
                "step": r[w]["step"], "inline": r[0]["step"]} for r in rounds]
        results.append({"workers": w, "step": med(r[w]["step"] for r in rounds),
                        "gen_inline": inline["generate"], "gen_dispatch": med(r[w]["gen"] for r in rounds),
                        "tail": med(r[w]["tail"] for r in rounds),
                        "verify_alone": med(r[w]["verify_alone"] for r in rounds),
                        "max": med(p["max"] for p in per), "sum": med(p["sum"] for p in per),
                        "step_over_max": med(p["step"] / p["max"] for p in per),
                        "step_over_sum": med(p["step"] / p["sum"] for p in per),
                        "speedup_vs_inline": med(p["inline"] / p["step"] for p in per),
                        "timeouts": sum(r[w]["timeouts"] for r in rounds)})
    return inline, results, mean_len


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="1,4", help="pool sizes to measure, comma-separated")
    p.add_argument("--verifiers", default="sandbox,sandbox+0.25,wait0.25",
                   help="one scenario each, comma-separated: 'sandbox' (one jailed run per response), 'sandbox+S' "
                        "(then S s of waiting: a remote sandbox's or a judge's round trip), 'waitS' (only the wait: "
                        "the control, a verifier that takes no CPU)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-limit", type=int, default=4, help="sequences decoded together (the rest wait)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]

    sizes = [int(x) for x in args.workers.split(",")]
    n = args.prompts * args.k
    scenarios = []
    for name in args.verifiers.split(","):
        if not (name.startswith("sandbox") or name.startswith("wait")):
            raise SystemExit(f"--verifiers: unknown verifier {name!r}: use sandbox, sandbox+S or waitS")
        jail = name.startswith("sandbox")
        wait_s = float(name.partition("+")[2] or 0) if jail else float(name.removeprefix("wait"))
        inline, results, mean_len = scenario(args, sizes, jail, wait_s)
        scenarios.append({"verifier": name, "inline": inline, "dispatch": results})
        what = ("the code sandbox" if jail else "no jail") + (f" + {wait_s:g} s wait" if wait_s else "")
        print(f"\n## verifier = {what}: {n} responses a step "
              f"(B={args.prompts} x K={args.k}, up to {args.max_tokens} tokens, mean {mean_len:.1f}), gpt_mini "
              f"d={args.d_model} L={args.layers}, {args.batch_limit} decoded together; medians of {args.steps} "
              f"rounds (ratios per round, then median)")
        print(f"inline: step {inline['step']:.2f} s = generate {inline['generate']:.2f} + verify "
              f"{inline['verify']:.2f} ({inline['verify'] / n * 1e3:.0f} ms a response)")
        print("| W | dispatch step s | generate s (inline; in dispatch) | verify alone in the pool s | max | sum | "
              "step / max | step / sum | vs inline |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['workers']} | {r['step']:.2f} | {r['gen_inline']:.2f}; {r['gen_dispatch']:.2f} | "
                  f"{r['verify_alone']:.2f} | {r['max']:.2f} | {r['sum']:.2f} | **{r['step_over_max']:.2f}** | "
                  f"{r['step_over_sum']:.2f} | {r['speedup_vs_inline']:.2f}x |")
    load1 = os.getloadavg()[0]
    print(f"machine: {machine()}; load average {load0:.1f} at start, {load1:.1f} at end")
    print(json.dumps({"bench": "dispatch", "machine": machine(), "loadavg": [load0, load1], "responses": n,
                      "scenarios": scenarios,
                      "bar_step_le_1.1x_max": {sc["verifier"]: [
                          r["step_over_max"] <= 1.1 for r in sc["dispatch"]] for sc in scenarios}}))


if __name__ == "__main__":
    main()
