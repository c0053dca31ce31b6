"""Curated vs uncurated prompts in RL (lesson 18a; issue 18's "must show"): does the pass-rate band pay for itself?

    1. a strong CoT start        rlpt sft sft.format=cot sft.steps=S                  (2-4 operands, 0..9)
    2. the prompt pool           2,000 distinct training prompts (rlpt data make-arith) and 200 held-out ones
    3. curation                  rlpt data curate POOL --policy START --eval held=HELD: dedup, decontaminate, answer
                                 check, p̂ of K = 8 samples at the rollout's temperature, band 0 < p̂ < 1
    4. RL from the start         on each pool through env.name=curriculum env.curriculum.prompts=FILE with
                                 floor 0.25 (every weight 0.25: a uniform draw, so only the pool differs),
                                 GRPO and DAPO, the same steps and seeds

and per run:

    degenerate fraction   GRPO: mean over steps of groups/degenerate_frac (the groups as sampled: all K rewards equal)
                          DAPO: mean of sampling/filtered_frac (the drawn groups its filter dropped)
    DAPO's redraws        mean over steps of sampling/draws (rounds) and of sampling/groups_drawn - prompts_per_step
                          (prompts sampled again because a group was degenerate; at the cap max_draws a step trains
                          on fewer groups: sampling/cap_hit)
    held-out accuracy     greedy acc/heldout (eval.size problems of the task) at equal wall-clock: for each algorithm
                          and seed, W = the shorter of the two runs' wall (the curated run charged the curation's
                          seconds), each run read at its last eval at or before W; and at equal steps (the last eval)

The arms are `uncurated` (the pool as made), `curated` (curated.jsonl) and, with --arms, `online` (curated.jsonl
with the online p(1-p) sampler: env.curriculum.floor=0.01, counts warm-started from curate's p̂) and
`online_pool` (the uncurated pool with the online sampler: no curation, p̂ learned from the run's own groups).

    python bench/curation.py --out runs/curation_study                     # all of it (resumes: finished runs
    python bench/curation.py --out runs/curation_study --seeds 0 --steps 10 #  and the start are reused)

Writes OUT/results.json (every run's summary) and OUT/curation.md (the tables). Wall-clock is the box's: on a
machine shared with other jobs it is noisy, so the tables also give the steps and samples each run took.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rlpt.report import machine


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/curation_study")
    p.add_argument("--sft-steps", type=int, default=400, help="CoT SFT steps of the start (lr 3e-3, cosine)")
    p.add_argument("--pool", type=int, default=2000, help="training prompts made")
    p.add_argument("--heldout", type=int, default=200, help="held-out prompts the pool is decontaminated against")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--algos", default="grpo,dapo")
    p.add_argument("--arms", default="uncurated,curated", help="of uncurated, curated, online, online_pool")
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--k", type=int, default=8, help="samples per prompt, in curation and in RL")
    p.add_argument("--temperature", type=float, default=0.7, help="in curation and in RL (the recipe's)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-size", type=int, default=400)
    p.add_argument("--lr", type=float, default=5e-5, help="trainer.optim.lr (recipes/grpo_arith.yaml's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--start", default=None, help="an existing CoT checkpoint or run folder as the start (no SFT)")
    p.add_argument("--model", default="", help="model.* overrides of the start and the RL runs, comma-separated "
                   "(the pipeline's: rope=false,operand_index=16,rope_theta=1e30)")
    p.add_argument("--max-operands", type=int, default=4, help="task.max_operands of the pool, held-out set and RL")
    p.add_argument("--band", default="0,1", help="curate's band LO,HI: keep LO < p̂ < HI (difficulty.low/high); "
                   "0.2,0.8 keeps 2/8..6/8 at K = 8")
    p.add_argument("--floor", type=float, default=0.01, help="env.curriculum.floor of the online arms")
    p.add_argument("--decay", type=float, default=1.0, help="env.curriculum.decay of the online arms")
    p.add_argument("--algorithm", default="", help="algorithm.* overrides of the RL runs, comma-separated (an "
                   "equal-work DAPO: max_draws=16,oversample=1.5 trains 16 informative groups every step in both arms)")
    p.add_argument("--set", default="", help="any other overrides of the RL runs, comma-separated KEY=VALUE "
                   "(trainer.optim.warmup_steps=20)")
    p.add_argument("--curated", default=None, metavar="FILE", help="train the curated arms on this prompt set "
                   "instead of curating the pool (bench/band_ceiling.py --save's bands; charged the seconds.json "
                   "beside it, else 0)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the degenerate fraction by step and held-out "
                   "accuracy against wall-clock, mean over seeds (default OUT/curation.png)")
    p.add_argument("--report", action="store_true", help="only tabulate the runs already finished under --out")
    return p.parse_args()


def model_overrides(args) -> list[str]:
    return [f"model.{kv}" for kv in args.model.split(",") if kv]


def sft_start(out: Path, args) -> Path:
    from rlpt.config import load_config
    from rlpt.sft import SFTJob, train_sft
    if args.start:
        return Path(args.start)
    folder = out / "start"
    if (folder / "checkpoints" / "latest").exists():
        return folder
    job = load_config(SFTJob, None, [f"run.out_dir={out}", "run.name=start", "sft.format=cot",
                                     f"sft.steps={args.sft_steps}", "sft.optim.lr=3e-3", "eval.size=400",
                                     f"eval.every={args.sft_steps}", "eval.max_tokens=40", "run.progress=false",
                                     f"run.threads={args.threads}", f"sft.ckpt_every={args.sft_steps}",
                                     *model_overrides(args)])
    train_sft(job)
    return folder


def pools(out: Path, start: Path, args) -> tuple[Path, Path, float]:
    """(uncurated pool, curated pool, seconds the curation took)."""
    from rlpt.cli import main
    from rlpt.config import load_config
    from rlpt.data.curate import CurateJob, curate
    train, held = out / "pool.jsonl", out / "held.jsonl"
    if not train.exists():
        task = [f"task.max_operands={args.max_operands}"]
        assert main(["data", "make-arith", str(train), "--n", str(args.pool), *task]) == 0
        assert main(["data", "make-arith", str(held), "--n", str(args.heldout), "--split", "heldout", *task]) == 0
    stamp = out / "curate" / "seconds.json"
    if not stamp.exists():
        job = load_config(CurateJob, None, [f"run.out_dir={out}", "run.name=curate", f"difficulty.k={args.k}",
                                            f"difficulty.temperature={args.temperature}",
                                            f"difficulty.max_tokens={args.max_tokens}", f"run.threads={args.threads}",
                                            f"difficulty.low={args.band.split(',')[0]}",
                                            f"difficulty.high={args.band.split(',')[1]}"],
                          base={"input": str(train), "policy": str(start), "eval": [f"held={held}"]})
        t0 = time.perf_counter()
        curate(job)
        stamp.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    return train, out / "curate" / "curated.jsonl", json.loads(stamp.read_text())["seconds"]


def rl_run(out: Path, start: Path, prompts: Path, algo: str, arm: str, seed: int, args) -> dict:
    """One RL run (reused if its summary exists) and its summary."""
    from rlpt.train import load_train_job, run_train
    name = f"{algo}_{arm}_s{seed}"
    done = out / "rl" / name / "summary.json"
    if done.exists():
        return summarise(out / "rl" / name, json.loads(done.read_text())["prompts"], algo, arm, seed)
    online = arm.startswith("online")
    floor, decay = (args.floor, args.decay) if online else (0.25, 1.0)
    job = load_train_job(None, [
        f"run.out_dir={out / 'rl'}", f"run.name={name}", f"run.seed={seed}", "run.progress=false",
        f"run.threads={args.threads}", f"init_from={start}", f"algorithm.name={algo}", f"steps={args.steps}",
        f"ckpt_every={args.steps}", "env.name=curriculum", f"env.curriculum.prompts={prompts}",
        f"env.curriculum.floor={floor}", f"env.curriculum.decay={decay}", "env.curriculum.probe=0",
        "env.curriculum.start_operands=0",
        f"rollout.k={args.k}", f"rollout.prompts_per_step={args.prompts_per_step}",
        f"rollout.temperature={args.temperature}", f"rollout.max_tokens={args.max_tokens}",
        f"eval.every={args.eval_every}", f"eval.size={args.eval_size}", f"trainer.optim.lr={args.lr}",
        f"task.max_operands={args.max_operands}", f"eval.max_tokens={max(args.max_tokens, 8 * args.max_operands)}",
        *model_overrides(args), *[f"algorithm.{kv}" for kv in args.algorithm.split(",") if kv],
        *[kv for kv in args.set.split(",") if kv]])
    _, run, _ = run_train(job)
    summary = summarise(run.dir, str(prompts), algo, arm, seed)
    done.write_text(json.dumps(summary))
    return summary


def metric_rows(folder: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict a line."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarise(folder: Path, prompts: str, algo: str, arm: str, seed: int) -> dict:
    """A finished run's summary, from its metrics.jsonl (module doc)."""
    rows = metric_rows(folder)
    steps = [r for r in rows if "reward/mean" in r]

    def mean(key):
        xs = [r[key] for r in steps if key in r]
        return sum(xs) / len(xs) if xs else None
    evals = [(r["step"], r.get("time/elapsed", 0.0), r["acc/heldout"]) for r in rows if "acc/heldout" in r]
    return {"algo": algo, "arm": arm, "seed": seed, "prompts": prompts, "steps": len(steps),
            "wall_s": max(r.get("time/elapsed", 0.0) for r in rows),
            "degenerate_frac": mean("groups/degenerate_frac"), "filtered_frac": mean("sampling/filtered_frac"),
            "draws": mean("sampling/draws"), "groups_drawn": mean("sampling/groups_drawn"),
            "groups_kept": mean("sampling/groups_kept"), "cap_hit": mean("sampling/cap_hit"),
            "skipped": mean("step/skipped"), "wasted_realised": mean("data/wasted_realised"),
            "first_degenerate": steps[0].get("groups/degenerate_frac") if steps else None,
            "reward_mean": mean("reward/mean"), "evals": evals}


def acc_at(summary: dict, wall: float, offset: float = 0.0) -> float:
    """Held-out accuracy at the last eval at or before `wall` seconds (the run's clock shifted by `offset`); the
    start's (step 0) while the curation is still running."""
    return ([a for _, t, a in summary["evals"] if t + offset <= wall + 1e-9] or [summary["evals"][0][2]])[-1]


def mean_sd(xs: list[float]) -> str:
    if not xs or any(x is None for x in xs):
        return "—"
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}" if len(xs) > 1 else f"{m:.3f}"


def tables(results: list[dict], curate_s: float, args, curated_rows: int) -> str:
    seeds = sorted({r["seed"] for r in results})
    arms = [a for a in args.arms.split(",") if any(r["arm"] == a for r in results)]
    out = [f"Measured on {machine()}; {args.steps} steps of {args.prompts_per_step} prompts x K = {args.k}, "
           f"T = {args.temperature}, seeds {seeds} (mean ± sd over seeds). The curated pool: {curated_rows} rows; "
           f"curation took {curate_s:.1f} s (charged to the curated runs at equal wall-clock).", "",
           "| algorithm | pool | degenerate frac | degenerate, step 1 | DAPO draws / step | groups drawn / step | "
           "groups kept / step | steps skipped | held-out start | held-out, last eval | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for algo in args.algos.split(","):
        for arm in arms:
            rs = [r for r in results if r["algo"] == algo and r["arm"] == arm]
            if not rs:
                continue
            deg = [r["filtered_frac"] if algo == "dapo" else r["degenerate_frac"] for r in rs]
            first = "—" if algo == "dapo" else mean_sd([r["first_degenerate"] for r in rs])   # DAPO's are filtered
            out.append(f"| {algo} | {arm} | {mean_sd(deg)} | {first} | "
                       f"{mean_sd([r['draws'] for r in rs])} | {mean_sd([r['groups_drawn'] for r in rs])} | "
                       f"{mean_sd([r['groups_kept'] for r in rs])} | {mean_sd([r['skipped'] for r in rs])} | "
                       f"{mean_sd([r['evals'][0][2] for r in rs])} | {mean_sd([r['evals'][-1][2] for r in rs])} | "
                       f"{mean_sd([r['wall_s'] for r in rs])} |")
    users = sum(r["arm"] in ("curated", "online") for r in results)      # the runs that share one curation
    out += ["", "Held-out accuracy at equal wall-clock (per algorithm and seed: W = the shorter run, the curated "
            f"one charged the whole curation; 'shared': charged 1/{users} of it, the curation reused by the "
            f"study's {users} runs on the curated pool):", "",
            "| algorithm | seed | W s | uncurated | curated | curated − uncurated | W s, shared | uncurated | "
            "curated | curated − uncurated |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for algo in args.algos.split(","):
        for seed in seeds:
            u = next((r for r in results if (r["algo"], r["arm"], r["seed"]) == (algo, "uncurated", seed)), None)
            c = next((r for r in results if (r["algo"], r["arm"], r["seed"]) == (algo, "curated", seed)), None)
            if u and c:
                cells = []
                for charge in (curate_s, curate_s / max(users, 1)):
                    w = min(u["wall_s"], c["wall_s"] + charge)
                    au, ac = acc_at(u, w), acc_at(c, w, charge)
                    cells.append(f"{w:.0f} | {au:.4f} | {ac:.4f} | {ac - au:+.4f}")
                out.append(f"| {algo} | {seed} | {' | '.join(cells)} |")
    return "\n".join(out) + "\n"


def per_step(folder: Path, key: str) -> list[float]:
    """`key` at every train step of a run (NaN where the step did not log it)."""
    return [r.get(key, float("nan")) for r in metric_rows(folder) if "reward/mean" in r]


def plot(out: Path, results: list[dict], curate_s: float, path: Path) -> Path:
    """Left: each algorithm x arm's degenerate fraction by step (GRPO: as sampled; DAPO: the drawn groups its
    filter dropped), mean over seeds. Right: held-out accuracy against wall-clock, the curated arms shifted by the
    curation's seconds, mean over seeds at each eval."""
    from rlpt.report import figure
    with figure(path, ncols=2, size=(12, 4.5)) as (left, right):
        for algo in sorted({r["algo"] for r in results}):
            for arm in sorted({r["arm"] for r in results if r["algo"] == algo}):
                rs = [r for r in results if (r["algo"], r["arm"]) == (algo, arm)]
                key = "sampling/filtered_frac" if algo == "dapo" else "groups/degenerate_frac"
                curves = [per_step(out / "rl" / f"{algo}_{arm}_s{r['seed']}", key) for r in rs]
                n = min(len(c) for c in curves)
                left.plot(range(1, n + 1), [sum(c[i] for c in curves) / len(curves) for i in range(n)],
                          label=f"{algo} {arm}")
                shift = curate_s if arm in ("curated", "online") else 0.0
                m = min(len(r["evals"]) for r in rs)
                right.plot([shift + sum(r["evals"][i][1] for r in rs) / len(rs) for i in range(m)],
                           [sum(r["evals"][i][2] for r in rs) / len(rs) for i in range(m)], marker="o",
                           label=f"{algo} {arm}")
        left.axhline(0.1, color="grey", linestyle=":", label="10 %")
        left.set(xlabel="step", ylabel="degenerate fraction (DAPO: filtered)", ylim=(0, 1))
        right.set(xlabel=f"wall-clock s (curated arms + {curate_s:.0f} s of curation)", ylabel="held-out accuracy")
        left.legend(fontsize=8)
        right.legend(fontsize=8)
    return path


def main() -> None:
    args = parse_args()
    import torch
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    start = sft_start(out, args)
    print(f"start: {start} ({time.perf_counter() - t0:.0f} s)", flush=True)
    uncurated, curated, curate_s = pools(out, start, args)
    if args.curated:
        curated = Path(args.curated)
        charge = curated.parent / "seconds.json"
        curate_s = json.loads(charge.read_text())["seconds"] if charge.exists() else 0.0
    files = {"uncurated": uncurated, "curated": curated, "online": curated, "online_pool": uncurated}
    curated_rows = sum(1 for line in curated.read_text().splitlines() if line.strip())
    print(f"curated: {curated_rows} rows in {curate_s:.1f} s", flush=True)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for algo in args.algos.split(","):
            for arm in args.arms.split(","):
                t1 = time.perf_counter()
                if args.report and not (out / "rl" / f"{algo}_{arm}_s{seed}" / "summary.json").exists():
                    continue
                r = rl_run(out, start, files[arm], algo, arm, seed, args)
                results.append(r)
                print(f"{algo} {arm} seed {seed}: degenerate {r['degenerate_frac']}, filtered {r['filtered_frac']}, "
                      f"draws {r['draws']}, held-out {r['evals'][0][2]} -> {r['evals'][-1][2]}, "
                      f"{time.perf_counter() - t1:.0f} s", flush=True)
                (out / "results.json").write_text(json.dumps({"curate_s": curate_s, "curated_rows": curated_rows,
                                                              "args": vars(args), "runs": results}, indent=1))
                (out / "curation.md").write_text(tables(results, curate_s, args, curated_rows))
    if results:
        print(f"plot: {plot(out, results, curate_s, Path(args.plot or out / 'curation.png'))}")
    print((out / "curation.md").read_text())


if __name__ == "__main__":
    main()
