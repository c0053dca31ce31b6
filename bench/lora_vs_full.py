"""LoRA-GRPO against full fine-tuning on the HF-exported gpt_mini (issue 16's must-show: LoRA reaches >= 80 % of
full fine-tuning's held-out gain in the same number of steps).

    1. a chain-of-thought SFT start     rlpt sft recipes/sft_arith.yaml sft.format=cot sft.steps=S   (or --init RUN)
    2. its Hugging Face export          rlpt export START OUT/start-hf                 (a LlamaForCausalLM directory)
    3. the learning rates, on ONE dev seed (--dev-seed, never a reported seed): full fine-tuning at each of
       --full-lrs and LoRA r 8 at each of --lora-lrs, the same steps; each arm keeps the lr with the best held-out
       gain on the dev seed (ties: the smaller lr)
    4. the reported seeds (--seeds)     rlpt train recipes/grpo_arith.yaml model.hf_path=OUT/start-hf run.seed=s
                                        steps=N trainer.optim.lr=LR_FULL                    (full fine-tuning)
                                        ... lora.r=8 lora.alpha=16 trainer.optim.lr=LR_LORA (LoRA, adapters only)

Held-out accuracy is the run's own `acc/heldout` (greedy, eval.size problems of the task's held-out split, the
same problems for every run), read from metrics.jsonl at step 0 and at the last step. Per seed: gain = end - start;
the ratio is mean(LoRA gains) / mean(full gains), with the per-seed ratios and a bootstrap over seeds (resampling
the seed pairs). A held-out accuracy of p on n problems has a binomial standard error sqrt(p(1-p)/n) (~0.024 at
p 0.6, n 400): differences below ~0.03 are inside the evaluation's own noise.

    python bench/lora_vs_full.py --out runs/lora_vs_full                    # all of it (finished runs are reused)
    python bench/lora_vs_full.py --out runs/lora_vs_full --init runs/sft    # reuse a CoT SFT start

Writes OUT/results.json and prints one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/lora_vs_full")
    p.add_argument("--init", default=None, help="a CoT SFT run or checkpoint folder to start from (else trained)")
    p.add_argument("--sft-steps", type=int, default=210, help="CoT SFT steps of the start (held-out ~0.5 at 180, "
                   "gains within tens of steps from it; 180 steps leaves a start GRPO needs ~300 steps to move)")
    p.add_argument("--recipe", default="recipes/grpo_arith.yaml")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", default="0,1,2", help="the reported seeds")
    p.add_argument("--dev-seed", type=int, default=100, help="the seed the learning rates are chosen on")
    p.add_argument("--full-lrs", default="5e-5", help="full fine-tuning lrs tried on the dev seed (one: used as is; "
                   "5e-5 is recipes/grpo_arith.yaml's)")
    p.add_argument("--lora-lrs", default="2e-4,5e-4,1.5e-3", help="LoRA lrs tried on the dev seed")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--prompts-per-step", type=int, default=32)
    p.add_argument("--eval-size", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--boot", type=int, default=10000, help="bootstrap resamples over seeds")
    return p.parse_args()


def cli(argv: list[str]) -> None:
    from rlpt.cli import main
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"rlpt {' '.join(argv)} failed with status {rc}")


def sft_start(out: Path, args) -> Path:
    if args.init:
        return Path(args.init)
    folder = out / "start"
    if (folder / "config.yaml").exists():   # a start from another --sft-steps is not this one: say so, never reuse it
        from rlpt.config import read_yaml
        had = read_yaml(folder / "config.yaml").get("sft", {}).get("steps")
        if had != args.sft_steps:
            raise SystemExit(f"{folder} was trained with sft.steps={had}, not --sft-steps {args.sft_steps}: "
                             "use another --out (or --sft-steps to match)")
    if not (folder / "checkpoints" / "latest").exists():
        cli(["sft", "recipes/sft_arith.yaml", f"run.out_dir={out}", "run.name=start", "sft.format=cot",
             f"sft.steps={args.sft_steps}", f"run.threads={args.threads}", "run.progress=false",
             f"eval.every={args.sft_steps}", "eval.size=200"])
    return folder


def export(out: Path, start: Path) -> Path:
    hf = out / "start-hf"
    if not (hf / "config.json").exists():
        cli(["export", str(start), str(hf), "--force"])
    return hf


def train(out: Path, hf: Path, arm: str, lr: float, seed: int, args) -> dict:
    """One `rlpt train` run (reused when its metrics show all steps) -> {start, end, steps, wall_s, ...}."""
    name = f"{arm}_lr{lr:g}_s{seed}"
    folder = out / f"rl{args.steps}" / name
    done = folder / "summary.json"
    if done.exists():
        return json.loads(done.read_text())
    items = [args.recipe, f"model.hf_path={hf}", f"run.out_dir={out / f'rl{args.steps}'}", f"run.name={name}",
             f"run.seed={seed}", f"run.threads={args.threads}", "run.progress=false", f"steps={args.steps}",
             f"ckpt_every={args.steps}", f"eval.every={max(1, args.steps // 2)}", f"eval.size={args.eval_size}",
             f"rollout.prompts_per_step={args.prompts_per_step}", f"trainer.optim.lr={lr}"]
    if arm == "lora":
        items += [f"lora.r={args.lora_r}", f"lora.alpha={args.lora_alpha}"]
    t0 = time.perf_counter()
    cli(["train", *items])
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = sorted((r["step"], r["acc/heldout"]) for r in rows if "acc/heldout" in r)
    steps = [r for r in rows if "reward/mean" in r]
    mism = [r["check/logp_mismatch"] for r in steps if "check/logp_mismatch" in r]
    s = {"arm": arm, "lr": lr, "seed": seed, "start": evals[0][1], "end": evals[-1][1],
         "gain": evals[-1][1] - evals[0][1], "steps": len(steps), "wall_s": time.perf_counter() - t0,
         "logp_mismatch_max": max(mism) if mism else None, "command": "rlpt train " + " ".join(items)}
    done.write_text(json.dumps(s))
    print(f"{name}: {s['start']:.4f} -> {s['end']:.4f} ({s['gain']:+.4f}) in {s['wall_s']:.0f} s", flush=True)
    return s


def best_lr(runs: list[dict]) -> float:
    """The lr of the largest dev gain; ties go to the smaller lr."""
    return min(runs, key=lambda r: (-round(r["gain"], 6), r["lr"]))["lr"]


def ratio_stats(full: list[float], lora: list[float], boot: int) -> dict:
    mf, ml = sum(full) / len(full), sum(lora) / len(lora)
    rng, ratios = random.Random(0), []
    for _ in range(boot):
        idx = [rng.randrange(len(full)) for _ in full]
        f = sum(full[i] for i in idx)
        if f > 0:
            ratios.append(sum(lora[i] for i in idx) / f)
    ratios.sort()
    q = (lambda a: ratios[min(len(ratios) - 1, int(a * len(ratios)))]) if ratios else (lambda a: None)
    return {"mean_gain_full": mf, "mean_gain_lora": ml, "ratio": ml / mf if mf > 0 else None,
            "per_seed_ratio": [lo / fu if fu > 0 else None for fu, lo in zip(full, lora)],
            "boot_ci90": [q(0.05), q(0.95)], "boot_frac_ge_0.8": sum(r >= 0.8 for r in ratios) / max(1, len(ratios)),
            "boot_resamples_kept": len(ratios)}


def main() -> None:
    args = parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from rlpt.report import machine
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    start = sft_start(out, args)
    hf = export(out, start)
    print(f"start {start}, export {hf} ({time.perf_counter() - t0:.0f} s)", flush=True)
    full_lrs = [float(x) for x in args.full_lrs.split(",")]
    lora_lrs = [float(x) for x in args.lora_lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.dev_seed in seeds:
        raise SystemExit(f"--dev-seed {args.dev_seed} is one of --seeds {seeds}: choose the lrs on another seed")
    dev = {"full": [train(out, hf, "full", lr, args.dev_seed, args) for lr in full_lrs] if len(full_lrs) > 1 else [],
           "lora": [train(out, hf, "lora", lr, args.dev_seed, args) for lr in lora_lrs] if len(lora_lrs) > 1 else []}
    lr = {"full": best_lr(dev["full"]) if dev["full"] else full_lrs[0],
          "lora": best_lr(dev["lora"]) if dev["lora"] else lora_lrs[0]}
    print(f"chosen on dev seed {args.dev_seed}: full lr {lr['full']:g}, LoRA lr {lr['lora']:g}", flush=True)
    runs = {arm: [train(out, hf, arm, lr[arm], s, args) for s in seeds] for arm in ("full", "lora")}
    stats = ratio_stats([r["gain"] for r in runs["full"]], [r["gain"] for r in runs["lora"]], args.boot)
    lines = [f"machine: {machine()}", f"{args.steps} steps, {args.prompts_per_step} prompts x K 8, held-out "
             f"{args.eval_size}, LoRA r {args.lora_r} alpha {args.lora_alpha}; lrs chosen on dev seed "
             f"{args.dev_seed}: full {lr['full']:g}, LoRA {lr['lora']:g}", "",
             "| arm | lr | seed | held-out start | end | gain | max logp mismatch | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, rs in [("dev " + a, dev[a]) for a in ("full", "lora")] + list(runs.items()):
        for r in rs:
            lines.append(f"| {arm} | {r['lr']:g} | {r['seed']} | {r['start']:.4f} | {r['end']:.4f} | "
                         f"{r['gain']:+.4f} | {r['logp_mismatch_max'] or 0:.1e} | {r['wall_s']:.0f} |")
    print("\n".join(lines))
    result = {"bench": "lora_vs_full", "steps": args.steps, "seeds": seeds, "dev_seed": args.dev_seed,
              "lr_full": lr["full"], "lr_lora": lr["lora"], **stats,
              "passes_0.8": stats["ratio"] is not None and stats["ratio"] >= 0.8,
              "runs": runs, "dev": dev, "wall_s": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "dev")}))


if __name__ == "__main__":
    main()
