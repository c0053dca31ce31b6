"""The stages' shared machinery: what `rlpt recipe` (rlpt.recipe) and `rlpt pipeline` (rlpt.pipeline) run each
stage with, and how they score every stage's final weights the same way.

    run_job_stage        run one stage's job into its folder (skip a finished one, continue an unfinished one)
    StageClock           each stage's wall clock, kept across --resume invocations
    evaluate_checkpoints greedy (and sampled) held-out accuracy and the harder slice of every stage's weights
    hf_row               a stage's row from its own last held-out evaluation (an HF policy on a prompt set)
    stage_table          the markdown table of those rows; plot_stage_rows: the same as a figure
    RSConfig, rejection_sample, check_rs_env    rejection-sampled SFT's data (DeepSeek-R1's third stage)

rlpt.recipe re-exports every name here, so `from rlpt.recipe import run_job_stage` keeps working.
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

import rlpt.envs  # noqa: F401 - registers the envs rs.env may name
from rlpt.checkpoint import finished_checkpoint, latest_checkpoint
from rlpt.config import ConfigError, EvalConfig, ModelConfig, Section, TaskConfig
from rlpt.framework.environment import ArithmeticEnv, Prompt, env_class, make_env
from rlpt.framework.evaluate import evaluate
from rlpt.gpt_mini.generate import SamplingParams
from rlpt.gpt_mini.model import load_model
from rlpt.gpt_mini.task import make_task
from rlpt.gpt_mini.tokenizer import EOS, CharTokenizer
from rlpt.preference.data import distinct_problems, sample_groups
from rlpt.report import figure


# -- helpers every multi-stage job shares (rlpt.recipe and rlpt.pipeline) ----------------------------------------
def run_job_stage(label: str, stage_dir: Path, steps: int, run: Callable[[bool], Any], resume: bool,
                  who: str = "recipe") -> Path:
    """Run one stage's job into `stage_dir` and return its final checkpoint. With `resume`, a finished stage is
    skipped and an unfinished one continues from its latest checkpoint. `run(resume_the_job)` runs the job."""
    if resume and (done := finished_checkpoint(stage_dir, steps)) is not None:
        print(f"[rlpt] {who}: {label} already finished ({done}); skipping")
        return done
    again = resume and latest_checkpoint(stage_dir) is not None
    print(f"[rlpt] {who}: stage {label} ({steps} steps) -> {stage_dir}")
    run(again)
    return latest_checkpoint(stage_dir)


class StageClock:
    """Each stage's wall clock, kept across invocations in stage_seconds.json: a stage skipped on --resume keeps
    the time it took, a continued one adds this invocation's time to what it had."""

    def __init__(self, root: Path, resume: bool):
        self.path = root / "stage_seconds.json"
        self.seconds: dict[str, float] = json.loads(self.path.read_text()) if resume and self.path.exists() else {}

    def add(self, stage: str, t0: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
        self.path.write_text(json.dumps(self.seconds))


class StageEval(Section):
    """How every stage's final weights are scored at the end (the same problems for all stages)."""
    samples: int = Field(4, ge=0, description="also score k samples per problem at `temperature` (0 = greedy only)")
    temperature: float = Field(1.0, gt=0)


class HardSlice(Section):
    """The harder slice: problems with more operands than any training prompt (never trained on)."""
    operands: int = Field(5, ge=2, description="operands per problem; must exceed task.max_operands")


def evaluate_checkpoints(ckpts: dict[str, Path], model: ModelConfig, task: TaskConfig, ev: EvalConfig,
                         hard: HardSlice, fe: StageEval, seed: int,
                         load: Callable[[Path], torch.nn.Module] | None = None) -> list[dict]:
    """Greedy (and sampled) accuracy of every stage's final checkpoint on the same two held-out sets. `load` turns
    a stage's entry into its policy (default: a gpt_mini checkpoint of shape `model`; a recipe on a Hugging Face
    policy passes a loader of the stage's save_pretrained directory)."""
    tok = CharTokenizer()
    env = ArithmeticEnv(make_task(task), tokenizer=tok)
    hard_env = ArithmeticEnv(make_task(task.model_copy(update={"min_operands": hard.operands,
                                                               "max_operands": hard.operands})), tokenizer=tok)
    train_dist, hard_set = env.heldout(ev.size), hard_env.heldout(ev.size)
    # a 5-operand chain of thought is ~6 characters per operand: give the harder slice room to finish
    hard_tokens = max(ev.max_tokens, 8 * hard.operands)
    rows = []
    for stage, ck in ckpts.items():
        m = load(ck) if load is not None else load_model(ck, model, tok)
        a = evaluate(m, env, train_dist, ev.max_tokens, k=fe.samples, temperature=fe.temperature, seed=seed)
        h = evaluate(m, hard_env, hard_set, hard_tokens)
        row = {"stage": stage, "checkpoint": str(ck), "acc/heldout": a["acc"], "acc/hard": h["acc"],
               "len/heldout": a["len"]}
        if fe.samples:   # the mean of k samples at T: what greedy accuracy near 1.0 no longer shows
            row["acc/heldout_sampled"] = a["acc_sampled"]
        rows.append(row)
    return rows


def hf_row(folder: str, ck: Path, out: Path | None = None) -> dict:
    """A stage's row from its own last held-out evaluation (metrics.jsonl); `out`: its save_pretrained directory."""
    rows = [json.loads(x) for x in (ck.parent.parent / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = [r for r in rows if "acc/heldout" in r][-1]
    return {"stage": folder, "checkpoint": str(out or ck), "acc/heldout": last["acc/heldout"], "acc/hard": float("nan"),
            "len/heldout": last.get("response/len_heldout", float("nan"))}


def stage_table(rows: list[dict], task: TaskConfig, eval_size: int, hard: HardSlice, fe: StageEval) -> str:
    lo, hi = task.min_operands, task.max_operands
    sampled = f" sampled ({fe.samples} per problem, T={fe.temperature:g}) |" if fe.samples else ""
    head = (f"| stage | held-out greedy ({lo}–{hi} operands, {eval_size} problems) |{sampled} "
            f"harder slice, greedy ({hard.operands} operands) | mean response length | seconds |")
    lines = [head, "|---|---:|" + ("---:|" if fe.samples else "") + "---:|---:|---:|"]
    for r in rows:
        s = f" {r['acc/heldout_sampled']:.4f} |" if fe.samples else ""
        lines.append(f"| {r['stage']} | {r['acc/heldout']:.4f} |{s} {r['acc/hard']:.4f} | {r['len/heldout']:.1f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def plot_stage_rows(rows: list[dict], hard: HardSlice, fe: StageEval, path: Path) -> Path:
    """Accuracy after each stage, one line per evaluation set, stages on the x axis."""
    series = {"held-out greedy (training distribution)": "acc/heldout",
              f"held-out sampled (T={fe.temperature:g})": "acc/heldout_sampled",
              f"harder slice ({hard.operands} operands), greedy": "acc/hard"}
    x = list(range(len(rows)))
    with figure(path) as ax:
        for label, key in series.items():
            if all(key in r for r in rows):
                ax.plot(x, [r[key] for r in rows], marker="o", label=label)
        ax.set_xticks(x, [r["stage"] for r in rows])
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("accuracy")
        ax.set_title("held-out accuracy after each stage")
        ax.legend(fontsize=8)
    return path


# -- rejection-sampled SFT (kind rs_sft) --------------------------------------------------------------------------

class RSConfig(Section):
    """Rejection sampling for an rs_sft stage: the policy's own verified samples become its SFT data."""
    prompts: int = Field(512, ge=1, description="distinct training prompts to sample")
    k: int = Field(8, ge=1, description="samples per prompt")
    temperature: float = Field(1.0, gt=0)
    max_tokens: int = Field(32, ge=1)
    env: str = Field("arithmetic", description="the env whose reward decides (one that scores without a model)")
    min_reward: float = Field(1.0, description="keep a sample whose reward is at least this (1.0: correct)")
    max_per_prompt: int = Field(1, ge=1, description="distinct kept responses per prompt at most")


def check_rs_env(name: str) -> None:
    """rs.env must be a registered env that scores without a model (a verifier)."""
    try:
        cls = env_class(name)
    except KeyError as e:
        raise ConfigError(f"rs.env: {e.args[0]}") from None
    if cls.model_path_arg is not None:
        raise ConfigError(f"rs.env={name} scores with a model; rejection sampling keeps what a verifier accepts "
                          "(arithmetic, format, ...)")


@torch.no_grad()
def rejection_sample(policy_ck: Path, job: Any, i: int, out: Path,
                     load: Callable[[Path], torch.nn.Module] | None = None) -> dict:
    """Sample the policy, keep the samples the env rewards ≥ rs.min_reward, write them as SFT demonstrations.
    `job` is the rlpt.recipe.RecipeJob (not imported: rlpt.recipe imports this module); `load` as in
    evaluate_checkpoints."""
    rs, tok = job.rs(i), CharTokenizer()
    task = make_task(job.task)
    env = make_env(rs.env, task=task, tokenizer=tok)
    policy = load(policy_ck) if load is not None else load_model(policy_ck, job.model.gpt_mini(), tok)
    problems = distinct_problems(task, random.Random(job.run.seed), rs.prompts, "train")
    gen = torch.Generator().manual_seed(job.run.seed)
    texts = sample_groups(policy, tok, [p.prompt for p in problems], rs.k,
                          SamplingParams(max_tokens=rs.max_tokens, temperature=rs.temperature), gen)
    rows, kept_prompts = [], 0
    for j, p in enumerate(problems):
        prompt, kept = Prompt(p.prompt, tok.encode(p.prompt), p.gold, {"operands": p.operands}), []
        for t in texts[j * rs.k:(j + 1) * rs.k]:
            if t.endswith(EOS) and t not in kept and env.verify(prompt, t).reward >= rs.min_reward:
                kept.append(t)
            if len(kept) == rs.max_per_prompt:
                break
        kept_prompts += bool(kept)
        rows += [{"prompt": p.prompt, "response": t} for t in kept]
    if not rows:
        raise ConfigError(f"stages[{i}] {job.stages[i].name!r}: no sample of {len(problems)} prompts × {rs.k} reached "
                          f"rs.min_reward={rs.min_reward:g}; raise rs.k or start from a stronger policy")
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)
    return {"prompts": len(problems), "samples": len(texts), "kept": len(rows), "prompts_kept": kept_prompts}
