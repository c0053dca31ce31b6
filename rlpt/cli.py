"""`rlpt`: the command line. One sub-command per job; each takes an optional YAML recipe and
`key.sub=value` overrides, writes a run folder and prints a summary table.

    rlpt sft [recipe.yaml] [key=value ...] [--resume]
    rlpt train [recipe.yaml] [key=value ...] [--resume]         e.g. rlpt train algorithm.name=ppo
    rlpt dpo [recipe.yaml] [key=value ...] [--resume]
    rlpt rm [recipe.yaml] [key=value ...] [--resume]
    rlpt compare [recipe.yaml] [--algos a,b,...] [key=value ...]
    rlpt pipeline [recipe.yaml] [key=value ...] [--resume]       SFT -> CoT -> DPO -> RLVR (`make run`)
    rlpt recipe recipes/<x>.yaml [key=value ...] [--resume]     a multi-stage recipe (lesson 23, rlpt/recipe.py)
    rlpt eval CHECKPOINT [key=value ...] [--split heldout|train] [--pass-k K] [--format direct|cot|tool]
                                                                 (an HF run: its own model, tokenizer, env and data)
    rlpt prm | orm [recipe.yaml] [key=value ...] [--resume]     process / outcome reward models (rlpt/search/cli.py)
    rlpt search [recipe.yaml] [key=value ...]                    test-time search strategies vs budget
    rlpt perf memory|kv|throughput [options]                     lesson 22's math (rlpt/perf/cli.py)
    rlpt diagnose RUN [--no-report]                              named findings from a run's metrics
    rlpt data make-arith|curate [options]                        prompt sets and their curation (rlpt/data/cli.py)

Each job's config schema opens the job's module: TrainJob rlpt/train.py, PipelineJob rlpt/pipeline.py,
DPOJob rlpt/preference/dpo.py, RMJob rlpt/preference/reward_model.py, `rlpt eval`'s EvalJob rlpt/eval_cmd.py;
rlpt/config.py holds the loader and the sections several jobs share; SFTJob opens rlpt/sft.py.

Overrides may come before or after the options (`rlpt eval runs/x --pass-k 2 eval.size=50`). Every bad
input ends the same way: one line on stderr, `rlpt <command>: error: <what is wrong and how to fix it>`,
and exit status 2 (no traceback): a usage mistake, a ConfigError, a checkpoint that cannot be used, and
an OSError (disk full, read-only disk, run.out_dir a file) naming the path.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys

from rlpt.config import ConfigError, key_list, load_config, one_line, quote, split_recipe_args
from rlpt.eval_cmd import EvalJob, cmd_eval, evaluate_in_chunks  # noqa: F401  (EvalJob, evaluate_in_chunks: re-exported)


def _report(run, title: str, final: dict, plots: dict[str, list[str]]) -> int:
    """A finished job's tail: report.md and plots in the run folder, then the summary table."""
    from rlpt.report import fmt, table, write_report
    report = write_report(run, title, final, plots=plots)
    print(table([(k, fmt(v)) for k, v in final.items()] + [("run folder", str(run.dir)), ("report", str(report))]))
    return 0


def cmd_sft(args) -> int:
    import rlpt.envs  # noqa: F401 - registers trace formats (sft.format=tool)
    from rlpt.sft import SFTJob, train_sft
    path, overrides = split_recipe_args(args.items)
    job = load_config(SFTJob, path, overrides)
    args.out_dir = job.run.out_dir   # named by an OSError without a path (disk full)
    _, run, final = train_sft(job, resume=args.resume, allow_change=args.allow_change)
    return _report(run, "SFT", final, {"accuracy": ["acc/heldout"], "loss": ["loss/sft"]})


def cmd_train(args) -> int:
    from rlpt.train import load_train_job, run_train
    path, overrides = split_recipe_args(args.items)
    job = load_train_job(path, overrides)
    args.out_dir = job.run.out_dir   # named by an OSError without a path (disk full)
    _, run, final = run_train(job, resume=args.resume, allow_change=args.allow_change)
    return _report(run, f"RL ({job.algorithm.name})", final,
                   {"heldout_accuracy_and_reward": ["acc/heldout", "reward/mean"],
                    "kl_and_clip": ["kl/mean", "clip/frac"]})


def cmd_dpo(args) -> int:
    from rlpt.preference.dpo import DPOJob, run_dpo
    path, overrides = split_recipe_args(args.items)
    job = load_config(DPOJob, path, overrides)
    args.out_dir = job.run.out_dir   # named by an OSError without a path (disk full)
    _, run, final = run_dpo(job, resume=args.resume, allow_change=args.allow_change)
    return _report(run, f"Preference ({job.dpo.method})", final,
                   {"accuracy": ["acc/heldout", "reward/accuracy"], "margin": ["reward/margin"],
                    "logp": ["logp/chosen", "logp/rejected"]})


def cmd_rm(args) -> int:
    from rlpt.preference.reward_model import RMJob, train_rm
    path, overrides = split_recipe_args(args.items)
    job = load_config(RMJob, path, overrides)
    args.out_dir = job.run.out_dir   # named by an OSError without a path (disk full)
    _, run, final = train_rm(job, resume=args.resume, allow_change=args.allow_change)
    return _report(run, "Reward model (Bradley-Terry)", final,
                   {"pair_accuracy": ["rm/pair_acc_heldout", "rm/pair_acc"], "loss": ["loss/bt"]})


def _run_stages(args, noun: str, load, run, table) -> int:
    """A multi-stage job (`rlpt pipeline`, `rlpt recipe`): load the job, run its stages, print its table."""
    path, overrides = split_recipe_args(args.items)
    job = load(path, overrides)
    args.out_dir = job.run.out_dir   # named by an OSError without a path (disk full)
    root, rows = run(job, resume=args.resume, allow_change=args.allow_change)
    print(table(job, rows))
    print(f"{noun} folder: {root}   report: {root / 'report.md'}")
    return 0


def cmd_pipeline(args) -> int:
    from rlpt.pipeline import load_pipeline_job, pipeline_table, run_pipeline
    return _run_stages(args, "pipeline", load_pipeline_job, run_pipeline, pipeline_table)


def cmd_recipe(args) -> int:
    from rlpt.recipe import load_recipe, recipe_table, run_recipe
    return _run_stages(args, "recipe", load_recipe, run_recipe, recipe_table)


def cmd_compare(args) -> int:
    from rlpt.compare import run_compare, take_algos
    items, algos = take_algos(args.items, args.algos)
    path, overrides = split_recipe_args(items)
    out, _ = run_compare(path, overrides, algos)
    print((out / "compare.md").read_text())
    print(f"compare folder: {out}")
    return 0


class UsageError(Exception):
    """A command line argparse cannot read: main prints it as one line and exits 2."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{prog}: error: {message} (see `{prog} --help`)")


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line) instead of printing the usage block and exiting."""

    def error(self, message: str):
        raise UsageError(self.prog, message)


def count(text: str) -> int:
    """An argparse type: an int >= 0."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {quote(text)}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="rlpt", description="RL post-training you can read line by line.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Overrides are key.sub=value, e.g. `rlpt sft sft.steps=300 model.n_layer=2`.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    # the jobs that take a recipe, overrides and --resume: (command, help, what --resume does, function)
    jobs = [("sft", "supervised fine-tuning of gpt_mini on the arithmetic task", None, cmd_sft),
            ("train", "RL on a recipe: the six roles and the seven-step loop (GRPO by default)", None, cmd_train),
            ("pipeline", "the gpt_mini pipeline SFT -> CoT -> DPO -> RLVR, with a per-stage report (the README's "
             "main job, `make run`)", "skip finished stages, continue the unfinished one", cmd_pipeline),
            ("recipe", "a named multi-stage recipe (InstructGPT, R1-Zero, R1, Tulu 3, DAPO: recipes/*.yaml), each "
             "stage an ordinary job", "skip finished stages, continue the unfinished one", cmd_recipe),
            ("dpo", "DPO / IPO / KTO / ORPO / SimPO from an SFT checkpoint on preference pairs", None, cmd_dpo),
            ("rm", "a Bradley-Terry reward model (SFT trunk + scalar head) on preference pairs", None, cmd_rm)]
    for name, help_, resume_help, fn in jobs:
        j = sub.add_parser(name, help=help_)
        j.add_argument("items", nargs="*", metavar="[recipe.yaml] [key=value ...]")
        j.add_argument("--resume", action="store_true",
                       help=resume_help or "continue the run folder from its latest checkpoint")
        j.add_argument("--allow-change", default=(), metavar="KEY,...",
                       type=key_list,
                       help="with --resume: the config keys (or whole sections) that may differ from the run "
                            "folder's config.yaml, e.g. sft.steps,eval; any other change is refused")
        j.set_defaults(fn=fn)
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
    e.add_argument("--pass-k", type=count, default=0, metavar="K",
                   help="also report pass@k from k samples at temperature 1 (0 = off)")
    e.add_argument("--format", choices=["direct", "cot", "tool"], default=None,
                   help="how the model answers; tool runs the calculator in the agent loop "
                        "(default: from the run folder's config.yaml, else direct)")
    e.set_defaults(fn=cmd_eval)
    from rlpt.search.cli import add_commands  # rlpt prm / orm / search (lesson 17)
    add_commands(sub)
    from rlpt.perf.cli import add_commands as add_perf_commands  # rlpt perf / diagnose (lessons 22-28)
    add_perf_commands(sub)
    from rlpt.data.cli import add_commands as add_data_commands  # rlpt data make-arith / curate (lesson 18a)
    add_data_commands(sub)
    from rlpt.models.export import add_commands as add_export_commands  # rlpt export (HF Llama directory)
    add_export_commands(sub)
    from rlpt.lab.cli import add_commands as add_lab_commands  # rlpt lab: every lesson's widget in the browser
    add_lab_commands(sub)
    return p


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, but a `key=value` after an option is an override like one before it (argparse stops
    filling `items` at the first option; parse_intermixed_args cannot take sub-commands)."""
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "items")]
    if unknown:
        prog = f"{parser.prog} {args.command}" if getattr(args, "command", None) else parser.prog
        raise UsageError(prog, f"unrecognized arguments: {quote(' '.join(unknown))}")
    if extra:
        args.items = [*args.items, *extra]
    return args


# errno -> what to do about it, for the OSErrors a run folder meets
OS_HINTS = {errno.ENOSPC: "the disk is full: free space or set run.out_dir to another disk",
            errno.EDQUOT: "the disk quota is used up: free space or set run.out_dir to another disk",
            errno.EROFS: "the disk is read-only: set run.out_dir to a writable folder",
            errno.EACCES: "no permission: set run.out_dir to a folder you can write",
            errno.EPERM: "no permission: set run.out_dir to a folder you can write",
            errno.ENOTDIR: "a part of that path is a file, not a folder: set run.out_dir / run.name to a folder",
            errno.EISDIR: "that path is a folder, not a file",
            errno.ENAMETOOLONG: "the path is too long (255 bytes a name, 4096 in all): shorten it"}


def os_error_line(e: OSError, out_dir: str | None) -> str:
    """An OSError as one line: what failed, on which path (else under which run.out_dir), and what to do."""
    if e.errno is None:          # raised by rlpt itself with its own message (e.g. FileExistsError)
        return one_line(e)
    where = f" {quote(str(e.filename))}" if e.filename is not None else \
        f" (writing under run.out_dir {quote(out_dir)})" if out_dir else ""
    return f"{e.strerror or e}{where}" + (f": {OS_HINTS[e.errno]}" if e.errno in OS_HINTS else "")


def write_failure(e: Exception, out_dir: str | None) -> str | None:
    """One line for a failed checkpoint write that its library reports as its own exception, not an OSError:
    safetensors ("I/O error: No space left on device (os error 28)"), torch.save (a RuntimeError from its zip
    writer). None for any other exception."""
    msg = one_line(e)
    if type(e).__name__ == "SafetensorError" and "os error" in msg:
        code = re.search(r"os error (\d+)", msg)
        err = OSError(int(code.group(1)), os.strerror(int(code.group(1)))) if code else OSError(msg)
        return "writing a checkpoint failed: " + os_error_line(err, out_dir)
    if isinstance(e, RuntimeError) and any(s in msg for s in ("PytorchStreamWriter", "inline_container",
                                                              "file write failed")):
        where = f" under run.out_dir {quote(out_dir)}" if out_dir else ""
        return f"writing a checkpoint{where} failed ({quote(msg, 120)}): is the disk full? Free space or set " \
               "run.out_dir to another disk"
    return None


LINE_CHARS = 2000   # no error line is longer, whatever a library quoted (e.g. a 100 kB path)


def say(line: str, status: int = 2) -> int:
    """Print one error line to stderr (cut to LINE_CHARS); return the exit status."""
    if len(line) > LINE_CHARS:
        line = f"{line[:LINE_CHARS - 40]}... ({len(line)} chars in all)"
    print(line, file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse(parser, argv)
    except UsageError as e:
        return say(one_line(e))
    if args.command is None:   # `rlpt` alone: what the commands are, and an error status (nothing was run)
        parser.print_help()
        return 2
    from rlpt.errors import CheckpointError, LogpMismatchError, StopRequested  # without torch: `rlpt lab`
    err = f"rlpt {args.command}: error:"
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError) as e:
        return say(f"{err} {one_line(e)}")
    except OSError as e:     # disk full, read-only disk, run.out_dir a file, ...
        return say(f"{err} {os_error_line(e, getattr(args, 'out_dir', None))}")
    except LogpMismatchError as e:
        return say(f"rlpt {args.command}: stopped: {one_line(e)}", 3)
    except Exception as e:   # a checkpoint library's own word for a failed write; anything else is a bug: raised
        line = write_failure(e, getattr(args, "out_dir", None))
        if line is None:
            raise
        return say(f"{err} {line}")
    except KeyboardInterrupt as e:   # StopRequested (saved at a step boundary, or a 2nd Ctrl-C), or Ctrl-C at start-up
        why = one_line(e) if isinstance(e, StopRequested) else \
            "interrupted by Ctrl-C; --resume continues from the last checkpoint saved, if any"
        return say(f"rlpt {args.command}: {why}", 130)


if __name__ == "__main__":
    sys.exit(main())
