"""`rlpt`: the command line. One sub-command per job; each takes an optional YAML recipe and
`key.sub=value` overrides, writes a run folder and prints a summary table.

    rlpt sft [recipe.yaml] [key=value ...] [--resume]
    rlpt train [recipe.yaml] [key=value ...] [--resume]
    rlpt compare [recipe.yaml] [--algos a,b,...] [key=value ...]
    rlpt eval CHECKPOINT [key=value ...] [--split heldout|train] [--pass-k K]
"""
from __future__ import annotations

import argparse
import sys

from rlpt.config import ConfigError


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """First positional may be a recipe path; everything with '=' is an override."""
    path = None
    overrides = []
    for it in items:
        if "=" in it:
            overrides.append(it)
        elif path is None:
            path = it
        else:
            raise ConfigError(f"unexpected argument {it!r}: give at most one recipe file, then key=value overrides")
    return path, overrides


def cmd_sft(args) -> int:
    from rlpt.config import SFTJob, load_config
    from rlpt.gpt_mini.sft import train_sft
    from rlpt.report import fmt, table, write_report
    path, overrides = _split_args(args.items)
    job = load_config(SFTJob, path, overrides)
    model, run, final = train_sft(job, resume=args.resume)
    report = write_report(run, "SFT", final, plots={"accuracy": ["acc/heldout"], "loss": ["loss/sft"]})
    print(table([(k, fmt(v)) for k, v in final.items()] + [("run folder", str(run.dir)), ("report", str(report))]))
    return 0


def cmd_train(args) -> int:
    from rlpt.report import fmt, table, write_report
    from rlpt.train import load_train_job, run_train
    path, overrides = _split_args(args.items)
    job = load_train_job(path, overrides)
    ctl, run, final = run_train(job, resume=args.resume)
    report = write_report(run, f"RL ({job.algorithm['name']})", final,
                          plots={"heldout_accuracy_and_reward": ["acc/heldout", "reward/mean"],
                                 "kl_and_clip": ["kl/mean", "clip/frac"]})
    print(table([(k, fmt(v)) for k, v in final.items()] + [("run folder", str(run.dir)), ("report", str(report))]))
    return 0


def cmd_compare(args) -> int:
    from rlpt.compare import run_compare, take_algos
    items, algos = take_algos(args.items, args.algos)
    path, overrides = _split_args(items)
    out, _ = run_compare(path, overrides, algos)
    print((out / "compare.md").read_text())
    print(f"compare folder: {out}")
    return 0


def cmd_eval(args) -> int:
    import random

    from rlpt.config import EvalConfig, Section, TaskConfig, load_config
    from rlpt.gpt_mini.sft import evaluate, load_model, make_task
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.report import fmt, table

    class EvalJob(Section):
        task: TaskConfig = TaskConfig()
        eval: EvalConfig = EvalConfig()

    path, overrides = _split_args(args.items)
    if path is not None:
        raise ConfigError(f"rlpt eval takes key=value overrides after the checkpoint, not {path!r}")
    job = load_config(EvalJob, None, overrides)
    model = load_model(args.checkpoint)
    tok, task = CharTokenizer(), make_task(job.task)
    if args.split == "heldout":
        problems = task.heldout_set(job.eval.size)
    else:
        rng = random.Random(0)
        problems = [task.sample(rng, "train") for _ in range(job.eval.size)]
    res = evaluate(model, tok, problems, job.eval, pass_k=args.pass_k)
    print(table([(f"{k}/{args.split}", fmt(v)) for k, v in res.items()] + [("problems", str(len(problems)))]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlpt", description="RL post-training you can read line by line.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Overrides are key.sub=value, e.g. `rlpt sft sft.steps=300 model.n_layer=2`.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("sft", help="supervised fine-tuning of gpt_mini on the arithmetic task")
    s.add_argument("items", nargs="*", metavar="[recipe.yaml] [key=value ...]")
    s.add_argument("--resume", action="store_true", help="continue the run folder from its latest checkpoint")
    s.set_defaults(fn=cmd_sft)
    t = sub.add_parser("train", help="RL on a recipe: the six roles and the seven-step loop (GRPO by default)")
    t.add_argument("items", nargs="*", metavar="[recipe.yaml] [key=value ...]")
    t.add_argument("--resume", action="store_true", help="continue the run folder from its latest checkpoint")
    t.set_defaults(fn=cmd_train)
    c = sub.add_parser("compare", help="several algorithms from one SFT start, seed and budget: a table and a plot")
    c.add_argument("items", nargs=argparse.REMAINDER, metavar="[recipe.yaml] [key=value ...]",
                   help="--algos may also come after the recipe")
    c.add_argument("--algos", default=None, metavar="a,b,...",
                   help="comma-separated registered algorithms (default: all, in lineage order)")
    c.set_defaults(fn=cmd_compare)
    e = sub.add_parser("eval", help="held-out greedy accuracy and pass@k of a checkpoint")
    e.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    e.add_argument("items", nargs="*", metavar="key=value", help="task.* and eval.* overrides")
    e.add_argument("--split", choices=["heldout", "train"], default="heldout")
    e.add_argument("--pass-k", type=int, default=0, help="also report pass@k from k samples at temperature 1")
    e.set_defaults(fn=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    from rlpt.framework.controller import LogpMismatchError
    from rlpt.run import CheckpointError, StopRequested
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError, FileExistsError) as e:
        print(f"rlpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except LogpMismatchError as e:
        print(f"rlpt {args.command}: stopped: {e}", file=sys.stderr)
        return 3
    except StopRequested as e:
        print(f"rlpt {args.command}: {e}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
