"""What staleness costs GRPO on arithmetic, and whether truncated importance sampling (TIS) buys it back.

Three arms from one SFT start, each for S steps and the same seeds (issue 15's must-show):

    sync    sync.lag = 0                                   the batch is sampled with the weights it trains
    tis     sync.lag = η, algorithm.offpolicy.mode = tis    sampled η steps ago, w = min(π_prox/μ, 2)
    none    sync.lag = η, algorithm.offpolicy.mode = none   sampled η steps ago, PPO's ratio anchored at μ

`sync.lag` (rlpt.framework.lagged_sync) makes the staleness exact: from step η on, every batch was sampled with
the weights of exactly η train steps (weight versions, as `system.max_staleness` counts them) before, the same on
every step and every rerun; the async Ray topology reaches up to η depending on timing. In optimizer steps, as
`staleness/mean|max` counts them, that is η·m + j with m = --mini-batches (the recipe's 2) and j = 0 … m − 1;
`--mini-batches 1` makes it exactly η optimizer steps too. All arms see the
same number of samples (S × prompts_per_step × K) and are scored on the same held-out set (greedy, the recipe's
400 problems) every --eval-every steps.

Diagnostics for every arm, the `none` and `sync` ones included: π_prox (the trainer's log-probs before the update)
is scored in each arm, so the mismatch between sampler μ and trainer can be read where nothing corrects it
(rlpt.framework.offpolicy; ρ = π_prox/μ over the sampled tokens):
    diag/kl_k3          mean(ρ − 1 − log ρ), the k3 estimate of KL(μ ‖ π_prox)
    diag/ess_tis        (Σw)² / (N·Σw²) of the TIS weights w = min(ρ, 2) (= the tis arm's own offpolicy/ess)
    diag/ess_rho        the same for the raw ρ (what plain importance sampling would weigh)
    diag/clamped_frac   share of tokens with ρ > 2
plus the trainer's clip/frac (PPO clip against the arm's anchor: μ for sync and none, π_prox for tis) and
staleness/mean|max (optimizer steps). The π_prox forward added to `none` and `sync` changes nothing they train:
mode none never reads it.

    python bench/staleness.py                                   # SFT start + 3 arms x 3 seeds, JSON to --out
    python bench/staleness.py --init runs/x/sft/checkpoints/step_00000180 --steps 150 --seeds 0,1,2
    python bench/staleness.py --table a.json [b.json ...]       # the markdown tables of finished runs

Each finished run is appended to the JSON at once, so a long study keeps what it has measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ARMS = ("sync", "tis", "none")
DIAG = ("diag/kl_k3", "diag/ess_tis", "diag/ess_rho", "diag/clamped_frac")
STEP_KEYS = ("clip/frac", "staleness/mean", "staleness/max", "offpolicy/ess", "offpolicy/kl_k3", *DIAG,
             "reward/mean", "time/train", "time/ref")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", default=None, help="an rlpt SFT checkpoint; default: train the recipe's start now")
    p.add_argument("--sft-steps", type=int, default=180, help="the recipe's SFT start (grpo_arith's sft: section)")
    p.add_argument("--steps", type=int, default=150, help="GRPO steps per run (S)")
    p.add_argument("--lag", type=int, default=4, help="η: train steps between sampling and training (sync.lag)")
    p.add_argument("--mini-batches", type=int, default=2, help="optimizer steps per rollout batch (the recipe's 2)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-size", type=int, default=400)
    p.add_argument("--out", default="/tmp/staleness/staleness.json", help="results JSON (appended run by run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", nargs="+", default=None, help="print the tables of these results JSONs and exit")
    p.add_argument("overrides", nargs="*", help="more recipe overrides (key=value), applied to every arm")
    return p.parse_args()


def sft_start(args, out: Path) -> Path:
    """The recipe's SFT start at seed 0, trained into out/start unless --init names one (reused when finished)."""
    if args.init:
        return Path(args.init)
    from rlpt.train import load_train_job, sft_init
    job = load_train_job("recipes/grpo_arith.yaml", [f"run.out_dir={out}", "run.name=start", "run.progress=false",
                                                      f"sft.steps={args.sft_steps}", "run.seed=0"])
    return sft_init(job, resume=False)


def arm_overrides(arm: str, lag: int) -> list[str]:
    if arm == "sync":
        return ["sync.lag=0", "algorithm.offpolicy.mode=none"]
    return [f"sync.lag={lag}", f"algorithm.offpolicy.mode={arm}"]


@torch.no_grad()
def diagnostics(batch) -> dict:
    """The sampler/trainer mismatch of a collated batch (module doc), from its prox_logp and old_logp."""
    from rlpt.framework.offpolicy import behaviour_weights, ess
    prox, old, mask = batch.extra["prox_logp"], batch.old_logp, batch.mask
    _, _, m = behaviour_weights(prox, old, mask, "tis")
    n = int((mask > 0).sum())
    rho = torch.exp((prox - old) * mask)
    return {"diag/kl_k3": m["offpolicy/kl_k3"], "diag/ess_tis": m["offpolicy/ess"],
            "diag/ess_rho": ess(rho, mask) / n if n else 1.0, "diag/clamped_frac": m["offpolicy/clamped_frac"]}


def run_arm(args, init: Path, arm: str, seed: int) -> dict:
    """One GRPO run: held-out accuracy every --eval-every steps, the per-step metrics of STEP_KEYS."""
    from rlpt.framework.evaluate import evaluate
    from rlpt.framework.reference import Reference
    from rlpt.train import build, load_train_job
    job = load_train_job("recipes/grpo_arith.yaml", [
        f"init_from={init}", f"steps={args.steps}", f"run.seed={seed}", "run.progress=false",
        f"trainer.mini_batches={args.mini_batches}", f"eval.size={args.eval_size}", *arm_overrides(arm, args.lag),
        *args.overrides])
    torch.manual_seed(seed)
    ctl, heldout = build(job, init)
    if "prox_logp" not in ctl.reference.scorers:     # π_prox for the diagnostics in every arm (mode none ignores it)
        ctl.reference.scorers["prox_logp"] = Reference.prox_scorer(ctl.trainer.model, job.rollout.temperature,
                                                                   job.trainer.precision)
    train_step, diag = ctl.trainer.train_step, {}

    def diagnosed(batch, loss_fn):
        diag.update(diagnostics(batch))
        return train_step(batch, loss_fn)
    ctl.trainer.train_step = diagnosed

    def heldout_acc() -> float:
        r = job.rollout
        return evaluate(ctl.trainer.model, ctl.env, heldout, r.max_tokens, backend=r.backend)["acc"]

    evals, steps, t0 = [(0, heldout_acc())], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        diag.clear()
        m = ctl.step() | diag
        steps.append({k: m[k] for k in STEP_KEYS if k in m})
        if step % args.eval_every == 0 or step == args.steps:
            evals.append((step, heldout_acc()))
            print(f"  {arm} seed {seed} step {step}: acc {evals[-1][1]:.4f}", flush=True)
    samples = args.steps * job.rollout.prompts_per_step * job.rollout.k
    return {"arm": arm, "seed": seed, "lag": args.lag if arm != "sync" else 0, "steps": args.steps,
            "samples": samples, "evals": evals, "per_step": steps, "wall_s": time.perf_counter() - t0,
            "config": {"init": str(init), "overrides": job.model_dump(mode="json")["sync"],
                       "offpolicy": job.algorithm.offpolicy.model_dump()}}


# ---------------------------------------------------------------- the tables

def mean_of(rows: list[dict], key: str, start: int) -> float | None:
    xs = [r[key] for r in rows[start:] if key in r]
    return sum(xs) / len(xs) if xs else None


def final_acc(run: dict, last: int = 3) -> float:
    """The mean of the last `last` evals: one 400-problem eval moves by ~±0.02 from step to step."""
    return statistics.fmean(a for _, a in run["evals"][-last:])


def label(run: dict, lags: list[int]) -> str:
    """The arm's row name: `tis`, or `tis η=16` when the runs hold more than one lag."""
    return run["arm"] if run["arm"] == "sync" or len(lags) == 1 else f"{run['arm']} η={run['lag']}"


def tables(runs: list[dict]) -> str:
    """The markdown tables of finished runs (of one or several JSONs: runs of other lags get their own rows)."""
    lags = sorted({r["lag"] for r in runs if r["arm"] != "sync"})
    order = ["sync"] + [label({"arm": a, "lag": g}, lags) for g in lags for a in ARMS[1:]]
    arms = [a for a in order if any(label(r, lags) == a for r in runs)]
    by = {a: sorted((r for r in runs if label(r, lags) == a), key=lambda r: r["seed"]) for a in arms}
    seeds = sorted({r["seed"] for r in runs})
    lines = ["| arm | " + " | ".join(f"seed {s} (last eval / mean of last 3)" for s in seeds) + " | mean of last 3 |"
             + " ratio to sync | last eval, mean | its ratio to sync | gain over the start |", "|---" * (len(seeds) + 6)
             + "|"]
    sync_last = statistics.fmean(r["evals"][-1][1] for r in by["sync"]) if "sync" in by else None
    sync_mean = statistics.fmean(final_acc(r) for r in by["sync"]) if "sync" in by else None
    for a in arms:
        cells = []
        for s in seeds:
            r = next((r for r in by[a] if r["seed"] == s), None)
            cells.append(f"{r['evals'][-1][1]:.3f} / {final_acc(r):.3f}" if r else "—")
        m = statistics.fmean(final_acc(r) for r in by[a])
        last = statistics.fmean(r["evals"][-1][1] for r in by[a])
        gain = statistics.fmean(final_acc(r) - r["evals"][0][1] for r in by[a])
        ratio = f"{m / sync_mean:.3f}" if sync_mean else "—"
        last_ratio = f"{last / sync_last:.3f}" if sync_last else "—"
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {m:.3f} | {ratio} | {last:.3f} | {last_ratio} | "
                     f"{gain:+.3f} |")
    per_seed = []
    if "sync" in by:
        for a in arms:
            if a == "sync":
                continue
            rs = [final_acc(r) / final_acc(s) for r, s in zip(by[a], by["sync"]) if r["seed"] == s["seed"]]
            per_seed.append(f"{a}/sync per seed: " + ", ".join(f"{x:.3f}" for x in rs))
    head = "| arm | clip/frac | staleness mean / max | diag/kl_k3 | diag/ess_tis | diag/ess_rho | ρ > 2 | s/step |"
    lines += ["", *per_seed, "", "Per-step means from step η + 1 on (all seeds):", "", head, "|---" * 8 + "|"]
    for a in arms:
        rows = [x for r in by[a] for x in r["per_step"][r["lag"]:]]

        def f(k, fmt=".4f", rows=rows):
            v = mean_of(rows, k, 0)
            return format(v, fmt) if v is not None else "—"
        smax = max((x["staleness/max"] for x in rows), default=0)
        wall = statistics.fmean(r["wall_s"] / r["steps"] for r in by[a])
        lines.append(f"| {a} | {f('clip/frac')} | {f('staleness/mean', '.2f')} / {smax:.0f} | {f('diag/kl_k3', '.2e')}"
                     f" | {f('diag/ess_tis')} | {f('diag/ess_rho')} | {f('diag/clamped_frac')} | {wall:.2f} |")
    curve = ["", "Held-out accuracy by step (mean over seeds):", "",
             "| step | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for i, (step, _) in enumerate(by[arms[0]][0]["evals"]):
        curve.append(f"| {step} | " + " | ".join(f"{statistics.fmean(r['evals'][i][1] for r in by[a]):.3f}"
                                                    for a in arms) + " |")
    return "\n".join(lines + curve)


def main():
    args = parse_args()
    if args.table:
        print(tables([r for path in args.table for r in json.loads(Path(path).read_text())["runs"]]))
        return
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    init = sft_start(args, out.parent)
    print(f"[staleness] start {init} ({time.perf_counter() - t:.0f} s)", flush=True)
    record = {"init": str(init), "lag": args.lag, "steps": args.steps, "mini_batches": args.mini_batches,
              "argv": sys.argv[1:], "cpu": os.cpu_count(),
              "loadavg_start": os.getloadavg(), "runs": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm in args.arms.split(","):
            if arm not in ARMS:
                raise SystemExit(f"--arms: unknown arm {arm!r}, use {ARMS}")
            print(f"[staleness] {arm} seed {seed}", flush=True)
            record["runs"].append(run_arm(args, init, arm, seed))
            record["loadavg_end"] = os.getloadavg()
            out.write_text(json.dumps(record))
    print(tables(record["runs"]))


if __name__ == "__main__":
    main()
