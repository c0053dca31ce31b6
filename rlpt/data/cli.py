"""`rlpt data`: prompt sets for RL (lesson 18a), registered into `rlpt`'s parser by `add_commands(sub)`.

    rlpt data make-arith OUT.jsonl [--n N] [--split train|heldout] [task.*=... seed=S]
    rlpt data curate IN.jsonl [--policy RUN] [--eval [NAME=]HELD_OUT.jsonl ...] [key=value ...]

make-arith writes the arithmetic task's prompts as a prompt set (distinct problems of one split, fixed by the
seed), so curation runs offline on a fresh machine. curate chains the stages of rlpt/data/curate.py (its
CurateJob lists every key) into runs/curate/ (run.out_dir, run.name).
"""
from __future__ import annotations

import argparse
import random

from pydantic import Field

from rlpt.config import ConfigError, Section, TaskConfig, load_config, quote


class MakeArith(Section):
    task: TaskConfig = TaskConfig()
    seed: int = Field(0, ge=0, description="the draw of the problems")


def cmd_make_arith(args) -> int:
    from rlpt.data.prompts import PromptRow, write_prompts
    from rlpt.gpt_mini.task import make_task
    bad = [it for it in args.items if "=" not in it]
    if bad:
        raise ConfigError(f"unexpected argument {bad[0]!r}: rlpt data make-arith OUT.jsonl takes key=value overrides")
    job = load_config(MakeArith, None, args.items)
    task, rng, seen, rows = make_task(job.task), random.Random(job.seed), set(), []
    for _ in range(50 * args.n + 1000):
        if len(rows) == args.n:
            break
        p = task.sample(rng, args.split)
        if p not in seen:
            seen.add(p)
            rows.append(PromptRow(f"arith-{args.split}-{len(rows)}", p.prompt, str(p.gold), f"arith-{args.split}",
                                  {"operands": len(p.operands)}))
    path = write_prompts(args.out, rows)
    print(f"wrote {len(rows)} {args.split} prompts to {path}" +
          (f" (the split holds fewer distinct problems than --n {args.n})" if len(rows) < args.n else ""))
    return 0


def cmd_curate(args) -> int:
    from rlpt.data.curate import CurateJob, curate, summary
    from rlpt.report import fmt, table
    paths = [it for it in args.items if "=" not in it]
    if len(paths) > 1:
        raise ConfigError(f"unexpected argument {paths[1]!r}: give one input prompt set, then key=value overrides")
    base = {"eval": args.eval or []}
    if paths:
        base["input"] = paths[0]
    if args.policy:
        base["policy"] = args.policy
    job = load_config(CurateJob, None, [it for it in args.items if "=" in it], base=base)
    args.out_dir = job.run.out_dir
    folder, stages, rates = curate(job)
    print(table([(s.name, f"{s.n_in} -> {s.n_out}") for s in stages], headers=("stage", "rows")))
    if rates:
        print(table([(k, fmt(v)) for k, v in summary(rates, job).items()]))
    print(f"curated: {folder / 'curated.jsonl'}   report: {folder / 'report.md'}")
    return 0


def _positive(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {quote(text)}")
    return n


def add_commands(sub) -> None:
    """Register `rlpt data make-arith` and `rlpt data curate` on rlpt's sub-parsers."""
    d = sub.add_parser("data", help="prompt sets for RL: make the arithmetic set, curate a set (lesson 18a)")
    dsub = d.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    m = dsub.add_parser("make-arith", help="write the arithmetic task's prompts as a JSONL prompt set")
    m.add_argument("out", metavar="OUT.jsonl")
    m.add_argument("items", nargs="*", metavar="[key=value ...]", help="task.* overrides and seed=S")
    m.add_argument("--n", type=_positive, default=2000, help="distinct problems (default 2000)")
    m.add_argument("--split", choices=["train", "heldout"], default="train")
    m.set_defaults(fn=cmd_make_arith)
    c = dsub.add_parser("curate", help="dedup, decontaminate, answer-check and pass-rate-filter a prompt set into "
                                       "a run folder with a report")
    c.add_argument("items", nargs="*", metavar="IN.jsonl [key=value ...]")
    c.add_argument("--policy", default=None, metavar="RUN", help="checkpoint or run folder whose pass rates decide "
                                                                 "difficulty (default: skip that stage)")
    c.add_argument("--eval", action="append", metavar="[NAME=]PATH",
                   help="an eval set to decontaminate against (repeatable)")
    c.set_defaults(fn=cmd_curate)
