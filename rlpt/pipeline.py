"""`rlpt pipeline`: the course's gpt_mini pipeline, CoT SFT → DPO → RLVR, as one job; every stage has a job
only it can do, measured where it shows.

    rlpt pipeline [recipe.yaml] [key=value ...] [--resume]        (the README's `make run`)

Three stages, each an ordinary rlpt job with its own run folder under runs/<run.name>/, each starting from
the checkpoint the one before it left:

    1_cot    SFT on chain-of-thought traces of 2-4 operands     "<3+4+5>" -> "3+4=7,7+5=12#"
             teaches the format and the short problems (from random weights), 1500 steps
    2_dpo    DPO on the model's own samples, its canonical chain preferred to a wrong one (offline)
             sharpens the sampled distribution: shown by accuracy at T = 1, which greedy cannot show
    3_rlvr   GRPO against the verifier alone, task widened to `rl.max_operands` (6) through the online
             curriculum (env.name=curriculum: p̂(1-p̂)-weighted prompts, an operand ramp from hard.operands
             (5) that opens 6 when fresh 5-operand probes pass at 0.8)
             extends the model past its demonstrations: more operands than any SFT trace shows

The model is gpt_mini without rotary positions (model.rope=false, NoPE) and with operand-index embeddings
(model.operand_index=16; SFT shifts each row's indices by a random 0..8, cot.operand_offset): each token also
embeds which `+` term of the prompt, or which step of the response, it belongs to, so writing step i means
finding the prompt operand of index i, a match by content. A plain decoder instead copies operands by their
offset from the token it writes and stops after as many steps as its longest demonstration, so on 5 operands
it reads the wrong operand or stops after three steps and RL has nothing right to reinforce (0-15 % at best).
With both changes the SFT gets 5 operands right in 0.12-0.78 of greedy answers (by seed), nearly always as
four-step chains, and RL takes them to 0.90-0.92 (docs/pipeline.md, with the variants measured). Such a
gpt_mini cannot be exported to a Llama.

Every stage is evaluated the same way at the end (evaluate_stage_rows): the same held-out problems, greedy
and sampled at T = 1, on the training distribution and on each operand count beyond it.

Re-running with `--resume` skips the stages that finished and continues the one that did not.
"""
from __future__ import annotations

import re
import time
from collections.abc import Collection
from pathlib import Path

import torch
from pydantic import Field, model_validator

from rlpt.checkpoint import finished_checkpoint
from rlpt.config import (
    ConfigError,
    EvalConfig,
    ModelConfig,
    OptimConfig,
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
from rlpt.envs.curriculum import CurriculumConfig
from rlpt.framework.environment import ArithmeticEnv
from rlpt.framework.evaluate import evaluate
from rlpt.gpt_mini.model import load_model
from rlpt.gpt_mini.task import make_task
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.preference.dpo import DPOConfig, DPOJob, PairsConfig, run_dpo
from rlpt.report import figure, machine
from rlpt.run import claim_folder
from rlpt.sft import SFTJob, check_demonstration_fits, train_sft
from rlpt.stages import HardSlice, StageClock, StageEval, run_job_stage
from rlpt.train import EnvConfig, RolloutConfig, TrainerConfig, TrainJob, TrainStage, algorithm_overrides, run_train

RL_ALGORITHM = "grpo"   # keeps every group: the degenerate ones count in the reported degenerate fraction


class RLStage(TrainStage):
    """The RLVR stage: the keys of `rlpt train` that act on each step (rlpt.train.TrainStage), its env (the
    curriculum) and how far it widens the task; the stage's TrainJob adds the pipeline's run, model, task (with
    max_operands = rl.max_operands) and eval and the DPO stage's checkpoint as its start."""
    eval_every: int = Field(50, ge=1, description="the stage's eval.every (eval.size and max_tokens: the pipeline's)")
    max_operands: int = Field(6, ge=1, description="the RL task's widest operand count (task.max_operands for the "
                                                   "SFT and DPO stages): more than any demonstration")
    env: EnvConfig = EnvConfig(name="curriculum", curriculum=CurriculumConfig(
        pool=256, floor=0.01, start_operands=5, threshold=0.8, window=64, probe=4))


class PipelineJob(Section):
    run: RunConfig = RunConfig(name="pipeline", threads=1)   # 1 thread: as fast as 2 here, and reproducible
    # NoPE and operand-index embeddings: see the module doc (rope_theta is unused without RoPE; it stays as measured)
    model: ModelConfig = ModelConfig(rope_theta=1e30, rope=False, operand_index=16)
    task: TaskConfig = TaskConfig()                          # 2-4 operands: SFT, DPO, the training distribution
    hard: HardSlice = HardSlice()                            # the first slice past it (5); reported up to rl.max
    # 1500 steps: at 500 the operand index is not yet what the model reads (docs/pipeline.md)
    cot: SFTConfig = SFTConfig(steps=1500, format="cot", operand_offset=8)
    # pairs from 1024 prompts sampled at temperature 1.6: a 0.99 policy needs it to show enough mistakes (321 pairs
    # at seed 0; 98 at 1.3); 30 steps, as 100 overfit so few pairs and cost 0.09 on 5 operands (docs/pipeline.md)
    dpo: DPOConfig = DPOConfig(steps=30, pairs=PairsConfig(prompts=1024, temperature=1.6))
    rl: RLStage = RLStage(algorithm={"name": RL_ALGORITHM}, steps=200,
                          rollout=RolloutConfig(temperature=1.0, max_tokens=48),
                          trainer=TrainerConfig(optim=OptimConfig(lr=2e-4, warmup_steps=0, schedule="cosine")))
    eval: EvalConfig = EvalConfig(every=500, size=300, pass_k=1, max_tokens=48)
    final_eval: StageEval = StageEval()

    @model_validator(mode="after")
    def _check(self):
        if self.cot.format != "cot":
            raise ValueError("cot.format must be 'cot' (the stage is named by it)")
        if self.hard.operands <= self.task.max_operands:
            raise ValueError(f"hard.operands ({self.hard.operands}) must exceed task.max_operands "
                             f"({self.task.max_operands}): the harder slice has more operands than any training prompt")
        if self.rl.max_operands < self.hard.operands:
            raise ValueError(f"rl.max_operands ({self.rl.max_operands}) must be >= hard.operands "
                             f"({self.hard.operands}): RL widens the task to the slices it is judged on")
        start = self.rl.env.curriculum.start_operands
        if self.rl.env.name == "curriculum" and start and not self.task.min_operands <= start <= self.rl.max_operands:
            raise ValueError(f"rl.env.curriculum.start_operands ({start}) must lie in task.min_operands.."
                             f"rl.max_operands ({self.task.min_operands}..{self.rl.max_operands}), or be 0 for no ramp")
        check_prompt_fits(self.task, self.model.max_seq_len, self.hard.operands, "hard.operands")
        check_prompt_fits(self.task, self.model.max_seq_len, self.rl.max_operands, "rl.max_operands")
        check_demonstration_fits(self.task, self.cot.format, self.model.max_seq_len, "cot.format")
        return self

    @property
    def slices(self) -> list[int]:
        """The operand counts reported beyond the training distribution: hard.operands .. rl.max_operands."""
        return list(range(self.hard.operands, self.rl.max_operands + 1))

    def stage_job(self, stage: str, init: str | None) -> SFTJob | DPOJob | TrainJob:
        """The ordinary job that runs `stage`: the stage's own section, and what every stage shares (the run
        folder runs/<run.name>/<stage>/, the model, the task, the held-out eval, the previous stage's weights)."""
        root = Path(self.run.out_dir) / self.run.name
        shared = {"run": self.run.model_copy(update={"out_dir": str(root), "name": stage}), "model": self.model,
                  "task": self.task, "init_from": init, "eval": self.eval.model_copy(update={"pass_k": 1})}
        if stage == "1_cot":
            return SFTJob(**shared, sft=self.cot)
        if stage == "2_dpo":
            return DPOJob(**shared, dpo=self.dpo)
        rl = dict(self.rl)
        every, widest = rl.pop("eval_every"), rl.pop("max_operands")
        task = self.task.model_copy(update={"max_operands": widest})
        ev = self.eval.model_copy(update={"every": every, "pass_k": 1,
                                          "max_tokens": max(self.eval.max_tokens, slice_tokens(widest))})
        return TrainJob(**(shared | {"task": task, "eval": ev}), **rl)


STAGES = ("1_cot", "2_dpo", "3_rlvr")


# -- the evaluation every stage's final weights get: the same problems for all stages ------------------------------
def slice_tokens(operands: int) -> int:
    """Room for an n-operand chain of thought: n - 1 steps of at most 8 characters ("45+9=54,"), then EOS."""
    return 8 * operands


def evaluate_stage_rows(ckpts: dict[str, Path], model: ModelConfig, task: TaskConfig, ev: EvalConfig,
                        slices: list[int], fe: StageEval, seed: int) -> list[dict]:
    """One row per stage: acc/heldout, acc/heldout_sampled, len/heldout, and per slice n acc/n_ops (greedy) and
    acc/n_ops_sampled, each stage on the same problems and the same seeded samples."""
    tok = CharTokenizer()
    env = ArithmeticEnv(make_task(task), tokenizer=tok)
    envs = {n: ArithmeticEnv(make_task(task.model_copy(update={"min_operands": n, "max_operands": n})), tokenizer=tok)
            for n in slices}
    held = env.heldout(ev.size)
    sets = {n: e.heldout(ev.size) for n, e in envs.items()}
    rows = []
    for stage, ck in ckpts.items():
        m = load_model(ck, model, tok)
        a = evaluate(m, env, held, ev.max_tokens, k=fe.samples, temperature=fe.temperature, seed=seed)
        row = {"stage": stage, "checkpoint": str(ck), "acc/heldout": a["acc"], "len/heldout": a["len"]}
        if fe.samples:
            row["acc/heldout_sampled"] = a["acc_sampled"]
        for n, e in envs.items():
            h = evaluate(m, e, sets[n], max(ev.max_tokens, slice_tokens(n)), k=fe.samples,
                         temperature=fe.temperature, seed=seed)
            row[f"acc/{n}_ops"] = h["acc"]
            if fe.samples:
                row[f"acc/{n}_ops_sampled"] = h["acc_sampled"]
        rows.append(row)
    return rows


def stage_rows_table(rows: list[dict], task: TaskConfig, eval_size: int, slices: list[int], fe: StageEval) -> str:
    """Markdown: one line per stage; `greedy / sampled` where samples were scored."""
    def cell(r, key):
        s = f" / {r[key + '_sampled']:.3f}" if fe.samples else ""
        return f"{r[key]:.3f}{s}"
    kind = f"greedy / sampled ({fe.samples} per problem, T={fe.temperature:g})" if fe.samples else "greedy"
    head = (f"| stage | {task.min_operands}–{task.max_operands} operands (training distribution) | "
            + " | ".join(f"{n} operands" for n in slices) + " | mean response length | seconds |")
    lines = [f"Held-out accuracy, {eval_size} problems per set, {kind}:", "", head,
             "|---|---:|" + "---:|" * len(slices) + "---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {cell(r, 'acc/heldout')} | "
                     + " | ".join(cell(r, f"acc/{n}_ops") for n in slices)
                     + f" | {r['len/heldout']:.1f} | {r.get('seconds', 0.0):.0f} |")
    return "\n".join(lines)


def plot_stage_accuracy(rows: list[dict], task: TaskConfig, slices: list[int], fe: StageEval, path: Path) -> Path:
    """Accuracy after each stage, one line per evaluation set (solid greedy, dashed sampled), stages on x."""
    x = list(range(len(rows)))
    sets = {f"{task.min_operands}–{task.max_operands} operands": "acc/heldout"} | \
        {f"{n} operands": f"acc/{n}_ops" for n in slices}
    with figure(path) as ax:
        for label, key in sets.items():
            line, = ax.plot(x, [r[key] for r in rows], marker="o", label=f"{label}, greedy")
            if fe.samples:
                ax.plot(x, [r[key + "_sampled"] for r in rows], marker="x", ls="--", color=line.get_color(),
                        label=f"{label}, sampled T={fe.temperature:g}")
        ax.set_xticks(x, [r["stage"] for r in rows])
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("held-out accuracy")
        ax.set_title("accuracy after each stage")
        ax.legend(fontsize=7)
    return path


def load_pipeline_job(path: str | None, overrides: list[str]) -> PipelineJob:
    """Defaults < the RL algorithm's own defaults (its `trainer_defaults`, as `rlpt train` applies them)
    < the recipe < overrides."""
    name = lookup(["rl", "algorithm", "name"], RL_ALGORITHM, [read_yaml(path) if path else {}], overrides)
    own = [f"rl.{o}" for o in algorithm_overrides(name)]
    try:
        return load_config(PipelineJob, path, overrides, base=apply_overrides({}, own))
    except ConfigError as e:   # the algorithm names its keys `algorithm.<key>`: here they are `rl.algorithm.<key>`
        raise ConfigError(re.sub(r"'algorithm\.", "'rl.algorithm.", str(e))) from None


def _steps(job: PipelineJob, stage: str) -> int:
    return {"1_cot": job.cot.steps, "2_dpo": job.dpo.steps, "3_rlvr": job.rl.steps}[stage]


def run_stage(job: PipelineJob, stage: str, init: Path | None, resume: bool,
              allow_change: Collection[str] = ()) -> Path:
    """Run one stage into runs/<run.name>/<stage>/ and return its final checkpoint. With `resume`, a
    finished stage is skipped and an unfinished one continues from its latest checkpoint."""
    stage_job = job.stage_job(stage, str(init) if init is not None else None)
    run = {"1_cot": train_sft, "2_dpo": run_dpo, "3_rlvr": run_train}[stage]
    return run_job_stage(stage, Path(job.run.out_dir) / job.run.name / stage, _steps(job, stage),
                         lambda again: run(stage_job, resume=again, allow_change=allow_change), resume, "pipeline")


def run_pipeline(job: PipelineJob, resume: bool = False, allow_change: Collection[str] = ()) -> tuple[Path, list[dict]]:
    """All three stages, then the same evaluation of each stage's final weights. Returns
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
    """Greedy and sampled accuracy of every stage's final checkpoint on the same held-out sets."""
    return evaluate_stage_rows(ckpts, job.model, job.task, job.eval, job.slices, job.final_eval, job.run.seed)


def pipeline_table(job: PipelineJob, rows: list[dict]) -> str:
    return stage_rows_table(rows, job.task, job.eval.size, job.slices, job.final_eval)


def plot_stages(job: PipelineJob, rows: list[dict], path: Path) -> Path:
    return plot_stage_accuracy(rows, job.task, job.slices, job.final_eval, path)


def write_pipeline_report(job: PipelineJob, root: Path, rows: list[dict], train_s: float, eval_s: float) -> Path:
    png = plot_stages(job, rows, root / "pipeline.png")
    parts = [f"# Pipeline {job.run.name}: CoT SFT → DPO → RLVR", "", f"Measured on {machine()}.", "",
             pipeline_table(job, rows), "",
             f"Wall clock: {train_s:.0f} s for the three stages (seconds column: each stage, summed over the "
             f"invocations that ran it), {eval_s:.0f} s for this evaluation.", ""]
    parts += [f"![accuracy after each stage]({png.name})", ""]
    path = root / "report.md"
    path.write_text("\n".join(parts))
    return path
