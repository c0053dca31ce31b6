"""A trained PRM's step AUROC on N-operand slices of several policies' samples (issue 17, docs/search.md 3f).

A slice's AUROC needs right and wrong steps; one policy's samples can hold few of either (an imperfect policy
writes few right 5-operand steps, a strong one few wrong). So the scorer is read on each policy's samples in
turn: `hard_prompts` held-out problems of each operand count, sampled at T = 1 as `rlpt prm` samples its own
slice (`rlpt.search.jobs.hard_rows`), scored against exact step truth (`scorer_metrics`).

    python bench/prm_slices.py --scorer runs/prm_logp_opi --policies runs/policy_opi,runs/pipeline/1_cot \\
        [--operands 5,6] [--prompts 256]
-> one row per policy and slice: steps, right steps, step AUROC, outcome AUROC; one JSON line last.
"""
from __future__ import annotations

import argparse
import json

import torch

from rlpt.config import ModelConfig
from rlpt.engine.llm import LLM
from rlpt.gpt_mini.model import load_model
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.search.jobs import ScorerJob, hard_rows, scorer_metrics
from rlpt.search.scorer import load_scorer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scorer", required=True, help="an `rlpt prm` run folder")
    p.add_argument("--policies", required=True, help="comma-separated checkpoints or run folders")
    p.add_argument("--operands", default="5,6")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = CharTokenizer()
    scorer = load_scorer(args.scorer, tok)
    out = []
    for pol in args.policies.split(","):
        model = load_model(pol).eval()   # the policy's own stored config (NoPE, operand index, ...)
        cfg = ModelConfig(**{k: v for k, v in model.cfg.to_dict().items() if k in ModelConfig.model_fields})
        for n in map(int, args.operands.split(",")):
            job = ScorerJob(init_from=pol, model=cfg, run={"seed": args.seed},
                            scorer={"kind": "prm", "data": {"hard_prompts": args.prompts, "hard_operands": n,
                                                            "max_tokens": 8 * n}})
            rows = hard_rows(job, LLM(model, num_blocks=1024, block_size=16, tokenizer=tok))
            truth = [t for r in rows for t in r.truth]
            m = scorer_metrics(scorer, rows, f"{n}ops")
            row = {"policy": pol, "operands": n, "steps": len(truth), "right": sum(truth),
                   "step_auroc": m[f"prm/step_auroc_{n}ops"], "outcome_auroc": m[f"prm/outcome_auroc_{n}ops"]}
            out.append(row)
            print(f"{pol}  {n} operands: {row['steps']} steps ({row['right']} right)  step AUROC "
                  f"{row['step_auroc']:.4f}  outcome AUROC {row['outcome_auroc']:.4f}", flush=True)
    print(json.dumps({"scorer": args.scorer, "rows": out}))


if __name__ == "__main__":
    main()
