"""`rlpt pipeline`: the course's gpt_mini pipeline, SFT → CoT → DPO → RLVR, as one job.

    rlpt pipeline [recipe.yaml] [key=value ...] [--resume]        (the README's `make run`)

Four stages, each an ordinary rlpt job with its own run folder under runs/<run.name>/, each
starting from the checkpoint the one before it left:

    1_direct  SFT on direct answers        "<3+4+5>" -> "12#"             learns the format
    2_cot     SFT on chain-of-thought      "<3+4+5>" -> "3+4=7,7+5=12#"   learns to show the work
    3_dpo     DPO on the model's own samples, a correct chain preferred to a wrong one (offline)
    4_rlvr    GRPO against the verifier (on-policy; the last stage of every modern recipe)

The direct stage is short on purpose: it teaches the answer format, and the chain-of-thought
stage then starts from a model that already stops with EOS. Every stage is evaluated the same way
at the end (greedy, the same held-out problems), on the training distribution and on a harder
slice with more operands than any training prompt, so the report compares like with like.

Re-running with `--resume` skips the stages that finished and continues the one that did not;
every stage keeps its own checkpoints, so an interrupted pipeline loses at most one stage's
last few steps.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from rlpt.config import EvalConfig, ModelConfig, RunConfig, Section, SFTConfig, SFTJob, \
    TaskConfig, load_config
from rlpt.gpt_mini.sft import evaluate, load_model, make_task, train_sft
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.preference.dpo import DPOConfig, DPOJob, PairsConfig, run_dpo
from rlpt.report import fmt, plot_series
from rlpt.run import latest_checkpoint, load_state
from rlpt.train import CheckConfig, RolloutConfig, SyncConfig, TrainerConfig, TrainJob, run_train


class HardSlice(Section):
    """The harder slice: problems with more operands than any training prompt (never trained on)."""
    operands: int = Field(5, ge=2, description="operands per problem; must exceed task.max_operands")


class RLStage(Section):
    """The RLVR stage: the keys of `rlpt train` that a pipeline varies (see rlpt.train.TrainJob)."""
    algorithm: dict[str, Any] = Field(default_factory=lambda: {"name": "dapo"})
    rollout: RolloutConfig = RolloutConfig()
    trainer: TrainerConfig = TrainerConfig()
    sync: SyncConfig = SyncConfig()
    check: CheckConfig = CheckConfig()
    steps: int = Field(200, ge=1)
    eval_every: int = Field(50, ge=1)
    ckpt_every: int = Field(25, ge=1)


class PipelineJob(Section):
    run: RunConfig = RunConfig(name="pipeline", threads=1)   # 1 thread: as fast as 2 here, and reproducible
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    hard: HardSlice = HardSlice()
    direct: SFTConfig = SFTConfig(steps=150, format="direct")
    cot: SFTConfig = SFTConfig(steps=1500, format="cot")
    # pairs from 2048 prompts sampled at temperature 1.3: a 0.99 policy needs both to show enough mistakes
    dpo: DPOConfig = DPOConfig(pairs=PairsConfig(prompts=2048, temperature=1.3))
    rl: RLStage = RLStage()
    eval: EvalConfig = EvalConfig(every=200, size=1000, pass_k=1)

    @model_validator(mode="after")
    def _check(self):
        if self.direct.format != "direct" or self.cot.format != "cot":
            raise ValueError("direct.format must be 'direct' and cot.format 'cot' (the stages are named by them)")
        if self.hard.operands <= self.task.max_operands:
            raise ValueError(f"hard.operands ({self.hard.operands}) must exceed task.max_operands "
                             f"({self.task.max_operands}): the harder slice has more operands than any training prompt")
        TrainJob.model_validate(self._rl_job_dict(None))   # the RL stage's keys, checked at load time
        return self

    def _rl_job_dict(self, init: str | None) -> dict:
        rl = self.rl
        return {"run": self.run.model_dump(), "model": self.model.model_dump(), "task": self.task.model_dump(),
                "init_from": init, "rollout": rl.rollout.model_dump(), "algorithm": dict(rl.algorithm),
                "trainer": rl.trainer.model_dump(), "sync": rl.sync.model_dump(), "check": rl.check.model_dump(),
                "steps": rl.steps, "ckpt_every": rl.ckpt_every,
                "eval": self.eval.model_copy(update={"every": rl.eval_every}).model_dump()}


STAGES = ("1_direct", "2_cot", "3_dpo", "4_rlvr")


def load_pipeline_job(path: str | None, overrides: list[str]) -> PipelineJob:
    return load_config(PipelineJob, path, overrides)


def _finished(stage_dir: Path, steps: int) -> Path | None:
    ck = latest_checkpoint(stage_dir)
    return ck if ck is not None and load_state(ck)["step"] >= steps else None


def run_stage(job: PipelineJob, stage: str, init: Path | None, resume: bool) -> Path:
    """Run one stage into runs/<run.name>/<stage>/ and return its final checkpoint. With `resume`, a
    finished stage is skipped and an unfinished one continues from its latest checkpoint."""
    root = Path(job.run.out_dir) / job.run.name
    stage_dir = root / stage
    run_cfg = job.run.model_copy(update={"out_dir": str(root), "name": stage})
    steps = {"1_direct": job.direct.steps, "2_cot": job.cot.steps, "3_dpo": job.dpo.steps,
             "4_rlvr": job.rl.steps}[stage]
    if resume and (done := _finished(stage_dir, steps)) is not None:
        print(f"[rlpt] pipeline: {stage} already finished ({done}); skipping")
        return done
    again = resume and latest_checkpoint(stage_dir) is not None
    print(f"[rlpt] pipeline: stage {stage} ({steps} steps) -> {stage_dir}")
    init_s = str(init) if init is not None else None
    if stage in ("1_direct", "2_cot"):
        sft = job.direct if stage == "1_direct" else job.cot
        train_sft(SFTJob(run=run_cfg, model=job.model, task=job.task, sft=sft, init_from=init_s,
                         eval=job.eval.model_copy(update={"pass_k": 1})), resume=again)
    elif stage == "3_dpo":
        run_dpo(DPOJob(run=run_cfg, model=job.model, task=job.task, init_from=init_s, dpo=job.dpo,
                       eval=job.eval.model_copy(update={"pass_k": 1})), resume=again)
    else:
        d = job._rl_job_dict(init_s)
        d["run"] = run_cfg.model_dump()
        run_train(TrainJob.model_validate(d), resume=again)
    return latest_checkpoint(stage_dir)


def run_pipeline(job: PipelineJob, resume: bool = False) -> tuple[Path, list[dict]]:
    """All four stages, then the same evaluation of each stage's final weights. Returns
    (pipeline folder, one row per stage)."""
    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    root = Path(job.run.out_dir) / job.run.name
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ckpts, seconds, init = {}, {}, None
    for stage in STAGES:
        t0 = time.perf_counter()
        init = ckpts[stage] = run_stage(job, stage, init, resume)
        seconds[stage] = time.perf_counter() - t0
    rows = evaluate_stages(job, ckpts)
    for r in rows:
        r["seconds"] = seconds[r["stage"]]
    write_pipeline_report(job, root, rows, time.perf_counter() - t_start)
    return root, rows


def evaluate_stages(job: PipelineJob, ckpts: dict[str, Path]) -> list[dict]:
    """Greedy accuracy of every stage's final checkpoint on the same two held-out sets."""
    tok = CharTokenizer()
    train_dist = make_task(job.task).heldout_set(job.eval.size)
    hard_task = make_task(job.task.model_copy(update={"min_operands": job.hard.operands,
                                                      "max_operands": job.hard.operands}))
    hard = hard_task.heldout_set(job.eval.size)
    # a 5-operand chain of thought is ~6 characters per operand: give the harder slice room to finish
    hard_eval = job.eval.model_copy(update={"max_tokens": max(job.eval.max_tokens, 8 * job.hard.operands)})
    rows = []
    for stage, ck in ckpts.items():
        model = load_model(ck, job.model, tok)
        a = evaluate(model, tok, train_dist, job.eval)
        h = evaluate(model, tok, hard, hard_eval)
        rows.append({"stage": stage, "checkpoint": str(ck), "acc/heldout": a["acc"], "acc/hard": h["acc"],
                     "len/heldout": a["len"]})
    return rows


def pipeline_table(job: PipelineJob, rows: list[dict]) -> str:
    lo, hi = job.task.min_operands, job.task.max_operands
    head = (f"| stage | held-out accuracy ({lo}–{hi} operands, {job.eval.size} problems) | "
            f"harder slice ({job.hard.operands} operands) | mean response length | seconds |")
    lines = [head, "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['acc/heldout']:.4f} | {r['acc/hard']:.4f} | {r['len/heldout']:.1f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def write_pipeline_report(job: PipelineJob, root: Path, rows: list[dict], total_s: float) -> Path:
    pts = [{"step": i + 1, "held-out (training distribution)": r["acc/heldout"],
            f"harder slice ({job.hard.operands} operands)": r["acc/hard"]} for i, r in enumerate(rows)]
    png = plot_series(pts, [k for k in pts[0] if k != "step"], root / "pipeline.png",
                      title="greedy accuracy after each stage (1 direct, 2 CoT, 3 DPO, 4 RLVR)")
    parts = [f"# Pipeline {job.run.name}: SFT → CoT → DPO → RLVR", "", pipeline_table(job, rows), "",
             f"Total wall clock: {total_s:.0f} s (stages skipped on --resume count 0).", ""]
    if png is not None:
        parts += [f"![accuracy after each stage]({png.name})", ""]
    path = root / "report.md"
    path.write_text("\n".join(parts))
    return path


def summary_rows(rows: list[dict]) -> list[tuple[str, str]]:
    out = []
    for r in rows:
        out.append((f"{r['stage']} acc/heldout", fmt(r["acc/heldout"])))
        out.append((f"{r['stage']} acc/hard", fmt(r["acc/hard"])))
    return out
