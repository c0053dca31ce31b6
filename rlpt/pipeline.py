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
at the end (the same held-out problems), on the training distribution and on a harder slice with
more operands than any training prompt, so the report compares like with like: greedy accuracy,
and the mean accuracy of k samples at temperature 1 (`final_eval`), which keeps measuring what DPO
and RL change once greedy accuracy is within a few problems of 1.0.

Re-running with `--resume` skips the stages that finished and continues the one that did not;
every stage keeps its own checkpoints, so an interrupted pipeline loses at most one stage's
last few steps.
"""
from __future__ import annotations

import time
from collections.abc import Collection
from pathlib import Path

import torch
from pydantic import Field, model_validator

from rlpt.checkpoint import finished_checkpoint
from rlpt.config import (
    EvalConfig,
    ModelConfig,
    RunConfig,
    Section,
    SFTConfig,
    TaskConfig,
    apply_overrides,
    check_prompt_fits,
    load_config,
    lookup,
    read_yaml,
)
from rlpt.preference.dpo import DPOConfig, DPOJob, PairsConfig, run_dpo
from rlpt.recipe import (
    HardSlice,
    StageClock,
    StageEval,
    evaluate_checkpoints,
    plot_stage_rows,
    run_job_stage,
    stage_table,
)
from rlpt.report import machine
from rlpt.run import claim_folder
from rlpt.sft import SFTJob, check_demonstration_fits, train_sft
from rlpt.train import TrainJob, TrainStage, algorithm_overrides, run_train

RL_ALGORITHM = "dapo"


class RLStage(TrainStage):
    """The RLVR stage: the keys of `rlpt train` that act on each step (rlpt.train.TrainStage); the stage's
    TrainJob adds the pipeline's run, model, task and eval and the DPO stage's checkpoint as its start."""
    eval_every: int = Field(50, ge=1, description="the stage's eval.every (eval.size and max_tokens: the pipeline's)")


class PipelineJob(Section):
    run: RunConfig = RunConfig(name="pipeline", threads=1)   # 1 thread: as fast as 2 here, and reproducible
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    hard: HardSlice = HardSlice()
    direct: SFTConfig = SFTConfig(steps=150, format="direct")
    cot: SFTConfig = SFTConfig(steps=1500, format="cot")
    # pairs from 2048 prompts sampled at temperature 1.3: a 0.99 policy needs both to show enough mistakes
    dpo: DPOConfig = DPOConfig(pairs=PairsConfig(prompts=2048, temperature=1.3))
    rl: RLStage = RLStage(algorithm={"name": RL_ALGORITHM}, steps=200)
    eval: EvalConfig = EvalConfig(every=200, size=1000, pass_k=1)
    final_eval: StageEval = StageEval()

    @model_validator(mode="after")
    def _check(self):
        if self.direct.format != "direct" or self.cot.format != "cot":
            raise ValueError("direct.format must be 'direct' and cot.format 'cot' (the stages are named by them)")
        if self.hard.operands <= self.task.max_operands:
            raise ValueError(f"hard.operands ({self.hard.operands}) must exceed task.max_operands "
                             f"({self.task.max_operands}): the harder slice has more operands than any training prompt")
        check_prompt_fits(self.task, self.model.max_seq_len, self.hard.operands, "hard.operands")   # the longest
        check_demonstration_fits(self.task, self.cot.format, self.model.max_seq_len, "cot.format")   # (direct's fit)
        return self

    def stage_job(self, stage: str, init: str | None) -> SFTJob | DPOJob | TrainJob:
        """The ordinary job that runs `stage`: the stage's own section, and what every stage shares (the run
        folder runs/<run.name>/<stage>/, the model, the task, the held-out eval, the previous stage's weights)."""
        root = Path(self.run.out_dir) / self.run.name
        shared = {"run": self.run.model_copy(update={"out_dir": str(root), "name": stage}), "model": self.model,
                  "task": self.task, "init_from": init, "eval": self.eval.model_copy(update={"pass_k": 1})}
        if stage in ("1_direct", "2_cot"):
            return SFTJob(**shared, sft=self.direct if stage == "1_direct" else self.cot)
        if stage == "3_dpo":
            return DPOJob(**shared, dpo=self.dpo)
        rl = dict(self.rl)
        every = rl.pop("eval_every")
        return TrainJob(**(shared | {"eval": self.eval.model_copy(update={"every": every})}), **rl)


STAGES = ("1_direct", "2_cot", "3_dpo", "4_rlvr")


def load_pipeline_job(path: str | None, overrides: list[str]) -> PipelineJob:
    """Defaults < the RL algorithm's own defaults (its `trainer_defaults`, as `rlpt train` applies them)
    < the recipe < overrides."""
    name = lookup(["rl", "algorithm", "name"], RL_ALGORITHM, [read_yaml(path) if path else {}], overrides)
    own = [f"rl.{o}" for o in algorithm_overrides(name)]
    return load_config(PipelineJob, path, overrides, base=apply_overrides({}, own))


def _steps(job: PipelineJob, stage: str) -> int:
    return {"1_direct": job.direct.steps, "2_cot": job.cot.steps, "3_dpo": job.dpo.steps, "4_rlvr": job.rl.steps}[stage]


def run_stage(job: PipelineJob, stage: str, init: Path | None, resume: bool,
              allow_change: Collection[str] = ()) -> Path:
    """Run one stage into runs/<run.name>/<stage>/ and return its final checkpoint. With `resume`, a
    finished stage is skipped and an unfinished one continues from its latest checkpoint."""
    stage_job = job.stage_job(stage, str(init) if init is not None else None)
    run = {"1_direct": train_sft, "2_cot": train_sft, "3_dpo": run_dpo, "4_rlvr": run_train}[stage]
    return run_job_stage(stage, Path(job.run.out_dir) / job.run.name / stage, _steps(job, stage),
                         lambda again: run(stage_job, resume=again, allow_change=allow_change), resume, "pipeline")


def run_pipeline(job: PipelineJob, resume: bool = False, allow_change: Collection[str] = ()) -> tuple[Path, list[dict]]:
    """All four stages, then the same evaluation of each stage's final weights. Returns
    (pipeline folder, one row per stage). `allow_change`: the stage jobs' keys a --resume may change."""
    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    root = Path(job.run.out_dir) / job.run.name
    lock, _ = claim_folder(root)   # one pipeline per folder, and never into a folder rlpt did not make
    try:
        return _run_stages(job, root, resume, allow_change)
    finally:
        lock.release()


def _run_stages(job: PipelineJob, root: Path, resume: bool, allow_change: Collection[str]) -> tuple[Path, list[dict]]:
    clock = StageClock(root, resume)   # each stage's wall clock, kept across invocations
    ckpts, init = {}, None
    for stage in STAGES:
        t0 = time.perf_counter()
        done = finished_checkpoint(root / stage, _steps(job, stage)) if resume else None
        init = ckpts[stage] = run_stage(job, stage, init, resume, allow_change)
        if done is None:   # it ran (from scratch, or continued): add this invocation's time to what it had
            clock.add(stage, t0)
    t0 = time.perf_counter()
    rows = evaluate_stages(job, ckpts)
    for r in rows:
        r["seconds"] = clock.seconds.get(r["stage"], 0.0)
    write_pipeline_report(job, root, rows, sum(clock.seconds.values()), time.perf_counter() - t0)
    return root, rows


def evaluate_stages(job: PipelineJob, ckpts: dict[str, Path]) -> list[dict]:
    """Greedy (and sampled) accuracy of every stage's final checkpoint on the same two held-out sets."""
    return evaluate_checkpoints(ckpts, job.model, job.task, job.eval, job.hard, job.final_eval, job.run.seed)


def pipeline_table(job: PipelineJob, rows: list[dict]) -> str:
    return stage_table(rows, job.task, job.eval.size, job.hard, job.final_eval)


def plot_stages(job: PipelineJob, rows: list[dict], path: Path) -> Path:
    """Accuracy after each stage, one line per evaluation set, stages on the x axis."""
    return plot_stage_rows(rows, job.hard, job.final_eval, path)


def write_pipeline_report(job: PipelineJob, root: Path, rows: list[dict], train_s: float, eval_s: float) -> Path:
    png = plot_stages(job, rows, root / "pipeline.png")
    parts = [f"# Pipeline {job.run.name}: SFT → CoT → DPO → RLVR", "", f"Measured on {machine()}.", "",
             pipeline_table(job, rows), "",
             f"Wall clock: {train_s:.0f} s for the four stages (seconds column: each stage, summed over the "
             f"invocations that ran it), {eval_s:.0f} s for this evaluation.", ""]
    parts += [f"![accuracy after each stage]({png.name})", ""]
    path = root / "report.md"
    path.write_text("\n".join(parts))
    return path


