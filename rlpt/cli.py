"""`rlpt`: the command line. One sub-command per job; each takes an optional YAML recipe and
`key.sub=value` overrides, writes a run folder and prints a summary table.

    rlpt sft [recipe.yaml] [key=value ...] [--resume]
    rlpt train [recipe.yaml] [key=value ...] [--resume]         e.g. rlpt train algorithm.name=ppo
    rlpt dpo [recipe.yaml] [key=value ...] [--resume]
    rlpt rm [recipe.yaml] [key=value ...] [--resume]
    rlpt compare [recipe.yaml] [--algos a,b,...] [key=value ...]
    rlpt pipeline [recipe.yaml] [key=value ...] [--resume]       SFT -> CoT -> DPO -> RLVR (`make run`)
    rlpt eval CHECKPOINT [key=value ...] [--split heldout|train] [--pass-k K] [--format direct|cot|tool]

Each job's config schema opens the job's module: TrainJob rlpt/train.py, PipelineJob rlpt/pipeline.py,
DPOJob rlpt/preference/dpo.py, RMJob rlpt/preference/reward_model.py, `rlpt eval`'s EvalJob this file;
rlpt/config.py holds the loader and the sections several jobs share; SFTJob opens rlpt/sft.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlpt.config import ConfigError, EvalConfig, Section, TaskConfig, load_config


class EvalJob(Section):
    """`rlpt eval`'s schema: the task the held-out problems come from, how many, how long an answer may be
    (eval.every and eval.pass_k are the training jobs'; here --pass-k chooses k)."""
    task: TaskConfig = TaskConfig()
    eval: EvalConfig = EvalConfig()


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


def _report(run, title: str, final: dict, plots: dict[str, list[str]]) -> int:
    """A finished job's tail: report.md and plots in the run folder, then the summary table."""
    from rlpt.report import fmt, table, write_report
    report = write_report(run, title, final, plots=plots)
    print(table([(k, fmt(v)) for k, v in final.items()] + [("run folder", str(run.dir)), ("report", str(report))]))
    return 0


def cmd_sft(args) -> int:
    import rlpt.envs  # noqa: F401 - registers trace formats (sft.format=tool)
    from rlpt.sft import SFTJob, train_sft
    path, overrides = _split_args(args.items)
    job = load_config(SFTJob, path, overrides)
    _, run, final = train_sft(job, resume=args.resume, allow_change=args.allow_change)
    return _report(run, "SFT", final, {"accuracy": ["acc/heldout"], "loss": ["loss/sft"]})


def cmd_train(args) -> int:
    from rlpt.train import load_train_job, run_train
    path, overrides = _split_args(args.items)
    job = load_train_job(path, overrides)
    _, run, final = run_train(job, resume=args.resume, allow_change=args.allow_change)
    return _report(run, f"RL ({job.algorithm.name})", final,
                   {"heldout_accuracy_and_reward": ["acc/heldout", "reward/mean"],
                    "kl_and_clip": ["kl/mean", "clip/frac"]})


def cmd_dpo(args) -> int:
    from rlpt.preference.dpo import DPOJob, run_dpo
    path, overrides = _split_args(args.items)
    job = load_config(DPOJob, path, overrides)
    _, run, final = run_dpo(job, resume=args.resume, allow_change=args.allow_change)
    return _report(run, f"Preference ({job.dpo.method})", final,
                   {"accuracy": ["acc/heldout", "reward/accuracy"], "margin": ["reward/margin"],
                    "logp": ["logp/chosen", "logp/rejected"]})


def cmd_rm(args) -> int:
    from rlpt.preference.reward_model import RMJob, train_rm
    path, overrides = _split_args(args.items)
    job = load_config(RMJob, path, overrides)
    _, run, final = train_rm(job, resume=args.resume, allow_change=args.allow_change)
    return _report(run, "Reward model (Bradley-Terry)", final,
                   {"pair_accuracy": ["rm/pair_acc_heldout", "rm/pair_acc"], "loss": ["loss/bt"]})


def cmd_pipeline(args) -> int:
    from rlpt.pipeline import load_pipeline_job, pipeline_table, run_pipeline
    path, overrides = _split_args(args.items)
    job = load_pipeline_job(path, overrides)
    root, rows = run_pipeline(job, resume=args.resume, allow_change=args.allow_change)
    print(pipeline_table(job, rows))
    print(f"pipeline folder: {root}   report: {root / 'report.md'}")
    return 0


def cmd_compare(args) -> int:
    from rlpt.compare import run_compare, take_algos
    items, algos = take_algos(args.items, args.algos)
    path, overrides = _split_args(items)
    out, _ = run_compare(path, overrides, algos)
    print((out / "compare.md").read_text())
    print(f"compare folder: {out}")
    return 0


EVAL_CHUNK = 256   # problems per evaluate() call: the progress bar moves every chunk


def evaluate_in_chunks(model, env, prompts: list, max_tokens: int, k: int = 0, progress: bool = True) -> dict:
    """rlpt.framework.evaluate.evaluate over `prompts` in chunks, with a progress bar; the same metrics.
    Every metric is a mean over the chunk's problems (acc_sampled over its k·n samples, k fixed), so the
    whole set's is the chunk means weighted by chunk size. Chunk i samples with seed i."""
    from tqdm import tqdm

    from rlpt.framework.evaluate import evaluate
    sums: dict[str, float] = {}
    seen: set[str] | None = None
    with tqdm(total=len(prompts), desc="eval", unit="problem", disable=not progress, dynamic_ncols=True) as bar:
        for i, start in enumerate(range(0, len(prompts), EVAL_CHUNK)):
            chunk = prompts[start:start + EVAL_CHUNK]
            res = evaluate(model, env, chunk, max_tokens, k=k, seed=i)
            seen = set(res) if seen is None else seen & set(res)   # a key some chunk lacks is not the set's
            for key, v in res.items():
                sums[key] = sums.get(key, 0.0) + v * len(chunk)
            bar.update(len(chunk))
    return {key: v / len(prompts) for key, v in sums.items() if key in seen}


def cmd_eval(args) -> int:
    import random

    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.task import make_task
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.report import fmt, table
    from rlpt.sft import sft_env

    path, overrides = _split_args(args.items)
    if path is not None:
        raise ConfigError(f"rlpt eval takes key=value overrides after the checkpoint, not {path!r}")
    job = load_config(EvalJob, None, overrides)
    model = load_model(args.checkpoint)
    tok, task = CharTokenizer(), make_task(job.task)
    form = args.format or _run_format(args.checkpoint)
    env = sft_env(form, task, tok)
    if args.split == "heldout":
        prompts = env.heldout(job.eval.size)
    else:
        env.rng = random.Random(0)
        prompts = [env.reset("train") for _ in range(job.eval.size)]
    res = evaluate_in_chunks(model, env, prompts, job.eval.max_tokens, k=args.pass_k)
    if args.pass_k:
        res.pop("acc_sampled")
    print(table([(f"{k}/{args.split}", fmt(v)) for k, v in res.items()]
                + [("problems", str(len(prompts))), ("format", form)]))
    return 0


def _run_format(checkpoint: str) -> str:
    """The response format a checkpoint's run was trained on, from its run folder's config.yaml:
    'tool' for a tool-using model (sft.format=tool, or RL with env.name=calculator), else 'direct'."""
    import yaml

    from rlpt.run import resolve_checkpoint
    ck = resolve_checkpoint(checkpoint)
    for cfg in (ck.parent.parent / "config.yaml", Path(checkpoint) / "config.yaml"):
        if cfg.is_file():
            data = yaml.safe_load(cfg.read_text()) or {}
            if (data.get("env") or {}).get("name") == "calculator" or (data.get("sft") or {}).get("format") == "tool":
                return "tool"
            return "direct"
    return "direct"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlpt", description="RL post-training you can read line by line.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Overrides are key.sub=value, e.g. `rlpt sft sft.steps=300 model.n_layer=2`.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    # the jobs that take a recipe, overrides and --resume: (command, help, what --resume does, function)
    jobs = [("sft", "supervised fine-tuning of gpt_mini on the arithmetic task", None, cmd_sft),
            ("train", "RL on a recipe: the six roles and the seven-step loop (GRPO by default)", None, cmd_train),
            ("pipeline", "the gpt_mini pipeline SFT -> CoT -> DPO -> RLVR, with a per-stage report (the README's "
             "main job, `make run`)", "skip finished stages, continue the unfinished one", cmd_pipeline),
            ("dpo", "DPO / IPO / KTO / ORPO / SimPO from an SFT checkpoint on preference pairs", None, cmd_dpo),
            ("rm", "a Bradley-Terry reward model (SFT trunk + scalar head) on preference pairs", None, cmd_rm)]
    for name, help_, resume_help, fn in jobs:
        j = sub.add_parser(name, help=help_)
        j.add_argument("items", nargs="*", metavar="[recipe.yaml] [key=value ...]")
        j.add_argument("--resume", action="store_true",
                       help=resume_help or "continue the run folder from its latest checkpoint")
        j.add_argument("--allow-change", default=(), metavar="KEY,...",
                       type=lambda s: tuple(filter(None, s.split(","))),
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
    e.add_argument("--pass-k", type=int, default=0, help="also report pass@k from k samples at temperature 1")
    e.add_argument("--format", choices=["direct", "cot", "tool"], default=None,
                   help="how the model answers; tool runs the calculator in the agent loop "
                        "(default: from the run folder's config.yaml, else direct)")
    e.set_defaults(fn=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:   # `rlpt` alone: what the commands are, and an error status (nothing was run)
        parser.print_help()
        return 2
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
