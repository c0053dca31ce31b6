"""How low can a pass-rate band push the degenerate-group fraction at the moment it is curated? (issue 18's "≤ 10 %")

Score every distinct prompt of a pool twice with K samples (two independent `pass_rates` calls, seeds 0 and 1),
choose the band on the first K and read the degenerate fraction (all K rewards equal) on the second: that is what
step 1 of RL on the band would see, regression to the mean included, before any learning moves the policy.

    python bench/band_ceiling.py --policy runs/pipeline/1_cot --pool 8000      # ~3,700 distinct sums, ~2.5 min
    python bench/band_ceiling.py ... --save runs/bands                         # and write each band as a prompt set

With --save DIR: DIR/band_LO_HI.jsonl for every band of the table (the rows' first measurement as metadata p_hat
and k, as rlpt data curate writes them, so `bench/curation.py --curated DIR/band_3_5.jsonl` trains on it) and
DIR/seconds.json (the first scoring's seconds: what curating one band cost).

Prints a table (band on the first K, rows kept, degenerate on the second K, expected by the first K's own p̂) and
one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", default="runs/pipeline/1_cot", help="checkpoint or run folder")
    p.add_argument("--pool", type=int, default=8000, help="training prompts made (exact duplicates then dropped)")
    p.add_argument("--max-operands", type=int, default=6)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save", default=None, metavar="DIR", help="write each band as a prompt set (module doc)")
    return p.parse_args()


def ceiling(first: list[int], second: list[int], k: int) -> list[dict]:
    """For each band lo..hi of successes out of k on the first measurement (the symmetric bands 1..k-1, 2..k-2,
    ...): rows kept, the degenerate fraction (0 or k of k) of their second measurement, and the plug-in
    expectation p^k + (1-p)^k at the first measurement's p̂ (rlpt.data.signal.wasted_fraction)."""
    from rlpt.data.signal import wasted_fraction

    def row(band: str, kept: list[tuple[int, int]]) -> dict:
        return {"band": band, "rows": len(kept), "degenerate_second": sum(b in (0, k) for _, b in kept) / len(kept),
                "expected_first": wasted_fraction([a / k for a, _ in kept], k)}
    pairs = list(zip(first, second))
    out = [row("none", pairs)]
    for lo in range(1, k // 2 + 1):
        if kept := [(a, b) for a, b in pairs if lo <= a <= k - lo]:
            out.append(row(f"{lo}..{k - lo} of {k}", kept))
    return out


def save_bands(folder, rows, successes: list[int], k: int, seconds: float) -> None:
    """Each symmetric band lo..k-lo of the first measurement as a prompt set, p̂ and k in each row's metadata."""
    from dataclasses import replace

    from rlpt.data.prompts import write_prompts
    folder.mkdir(parents=True, exist_ok=True)
    for lo in range(1, k // 2 + 1):
        kept = [replace(r, metadata={**r.metadata, "p_hat": s / k, "k": k})
                for r, s in zip(rows, successes) if lo <= s <= k - lo]
        write_prompts(folder / f"band_{lo}_{k - lo}.jsonl", kept)
    (folder / "seconds.json").write_text(json.dumps({"seconds": seconds}))


def main() -> None:
    args = parse_args()
    import tempfile
    from pathlib import Path

    import torch

    from rlpt.cli import main as rlpt
    from rlpt.data.dedup import exact_dedup
    from rlpt.data.difficulty import pass_rates
    from rlpt.data.prompts import read_prompts
    from rlpt.engine.llm import LLM
    from rlpt.framework.environment import ArithmeticEnv
    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.task import ArithmeticTask
    from rlpt.report import machine
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pool.jsonl"
        assert rlpt(["data", "make-arith", str(path), "--n", str(args.pool),
                     f"task.max_operands={args.max_operands}"]) == 0
        rows, _ = exact_dedup(read_prompts(path))
    env = ArithmeticEnv(ArithmeticTask(max_operands=args.max_operands))
    llm = LLM(load_model(args.policy), env.tokenizer, seed=0)
    scored, seconds = [], []
    for seed in (0, 1):
        t0 = time.perf_counter()
        scored.append([p.successes for p in pass_rates(llm, env, rows, args.k, args.temperature, args.max_tokens,
                                                       seed=seed, gold=int)])
        seconds.append(time.perf_counter() - t0)
    table = ceiling(scored[0], scored[1], args.k)
    if args.save:
        save_bands(Path(args.save), rows, scored[0], args.k, seconds[0])
    print(f"Measured on {machine()}; {len(rows)} distinct prompts of {args.pool}, K = {args.k}, "
          f"T = {args.temperature}, policy {args.policy}; scoring {seconds[0]:.1f} s + {seconds[1]:.1f} s\n")
    print("| band on the first K | rows kept | degenerate on the second K (step 1) | expected by the first K's p̂ |")
    print("|---|---:|---:|---:|")
    for r in table:
        print(f"| {r['band']} | {r['rows']} | {r['degenerate_second']:.3f} | {r['expected_first']:.3f} |")
    print(json.dumps({"bench": "band_ceiling", "rows": len(rows), "k": args.k, "seconds": seconds, "bands": table}))


if __name__ == "__main__":
    main()
