"""`rlpt recipe`: a named post-training recipe (lesson 23) as a list of stages, each an ordinary rlpt job.

    rlpt recipe recipes/instructgpt.yaml [key=value ...] [--resume]
    rlpt recipe recipes/r1.yaml run.name=r1_small rl1.steps=20 rs.rs.k=4      <stage name>.<key> sets a stage's key

A recipe is lesson 23's tuple (data, algorithm, reward, system, scale) written as stages. The file has the
sections every stage shares (run, model, task, eval; `hard` and `final_eval` as `rlpt pipeline` has them) and
`stages:`, a list of {name, kind, <that job's own keys>}:

    kind     job                                   starts from           leaves
    sft      rlpt sft (rlpt.sft.SFTJob)            the policy (or init)  the new policy
    rm       rlpt rm  (Bradley–Terry, RMJob)       the policy            a reward model; the policy unchanged
    dpo      rlpt dpo (DPOJob)                     the policy            the new policy
    train    rlpt train (TrainJob: GRPO, PPO, …)   the policy            the new policy
    rs_sft   rejection sampling, then rlpt sft     the policy            the new policy

Stage i (from 1) runs in runs/<run.name>/<i>_<name>/ as the job it names, with the shared sections and the
previous policy stage's final checkpoint as `init_from`. A first stage of kind `sft` starts from random weights
(gpt_mini's stand-in for pre-training); a first stage of kind `train` trains its own SFT start from its `sft:`
section, as `rlpt train` does, or starts from `model.hf_path`. An `rm` stage's run folder becomes the
`env.model_path` of every later train stage with `env.name: reward_model` that names none itself.

Rejection-sampled SFT (DeepSeek-R1's third stage, lesson 23): `rs.k` samples for each of `rs.prompts` distinct
training prompts from the current policy at `rs.temperature`; a sample is kept when the env `rs.env` gives it
reward ≥ `rs.min_reward` and it ended with EOS, at most `rs.max_per_prompt` distinct ones per prompt; the kept
(prompt, response) pairs are written to runs/<run.name>/<i>_<name>.jsonl and the stage is `rlpt sft` with
`sft.data_file` on them, from the current policy.

On a Hugging Face policy (`model.hf_path=<dir>`, docs/real_models.md "Recipes on a Hugging Face policy") every
stage kind runs on that model: the first stage starts from the directory (pretrained weights, not random ones),
each policy stage leaves its final weights as a `save_pretrained` directory <i>_<name>/hf/ (a LoRA train stage's
adapters merged in), and the next stage starts from that directory (a train stage as its model.hf_path; an sft,
rm, dpo or rs_sft stage gets the loaded policy, its checkpoints recording the directory). The sft, rm, dpo and
rs_sft stages train on the arithmetic task in gpt_mini's character ids, so with any of them the model's tokenizer
must be gpt_mini's (an `rlpt export` directory; checked before the first stage) -- unless the recipe's shared
`data:` section names a prompt set (`data.prompts=<file>`, as `rlpt train`'s): then every stage trains on it in the
model's own tokenizer (rlpt.text_stages): sft on the rows' solutions (or sft.data_file), dpo and rm on the
policy's own samples ranked by the math verifier, rs_sft on its verified samples, train stages with env.name=math
(or math_reward_model: the rm stage's RM scores the prompt set). The rows of such a recipe are each stage's own
last held-out evaluation, since there is no character-level task to score every stage on.

`--resume` skips the stages that finished and continues the one that did not (as `rlpt pipeline`; the per-stage
helpers both use, `run_job_stage`, `StageClock`, `evaluate_checkpoints`, `stage_table` and rejection sampling,
live in rlpt.stages and are re-exported here). At the end
every policy stage's final weights are evaluated the same way (greedy and sampled held-out accuracy, and the
harder slice) into report.md and stages.json.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

import rlpt.envs  # noqa: F401 - registers the envs a stage may name
from rlpt.checkpoint import finished_checkpoint
from rlpt.config import (
    ConfigError,
    EvalConfig,
    RunConfig,
    Section,
    TaskConfig,
    apply_overrides,
    check_prompt_fits,
    deep_merge,
    load_config,
    quote,
    read_yaml,
)
from rlpt.hf_policy import (
    ANY_TOKENIZER_ENVS,
    DataSection,
    TrainModelConfig,
    check_char_stage_tokenizer,
    check_hf_path,
    hf_meta,
    hf_tokenizer,
    load_char_policy,
    save_stage_policy,
)
from rlpt.lock import claim_folder
from rlpt.preference.dpo import DPOJob, run_dpo
from rlpt.preference.reward_model import RMJob, train_rm
from rlpt.report import machine
from rlpt.sft import SFTJob, train_sft
from rlpt.stages import (  # noqa: F401 - the stage helpers, re-exported: rlpt.pipeline imports them from here
    HardSlice,
    RSConfig,
    StageClock,
    StageEval,
    check_rs_env,
    evaluate_checkpoints,
    hf_row,
    plot_stage_rows,
    rejection_sample,
    run_job_stage,
    stage_table,
)
from rlpt.text_stages import TextTask, rejection_sample_text, text_stage_kwargs
from rlpt.train import TrainJob, load_train_job, run_train

# -- the recipe's schema ---------------------------------------------------------------------------------------
KINDS = ("sft", "rm", "dpo", "train", "rs_sft")
JOBS: dict[str, type[BaseModel]] = {"sft": SFTJob, "rm": RMJob, "dpo": DPOJob, "train": TrainJob, "rs_sft": SFTJob}
MAKES_POLICY = {"sft", "dpo", "train", "rs_sft"}       # an rm stage leaves the policy as it was
RUNNER_KEYS = ("run", "model", "init_from")          # set by the runner, never by a stage
RM_ENVS = ("reward_model", "math_reward_model")      # a train stage on one of these is scored by the rm stage's RM
_NAME = re.compile(r"[a-z][a-z0-9_]*")


class StageSpec(BaseModel):
    """One stage: its name, its kind, and (as extra keys) that job's own sections."""
    model_config = ConfigDict(extra="allow")
    name: str
    kind: str

    def own(self) -> dict:
        return dict(self.model_extra or {})


class RecipeJob(Section):
    run: RunConfig = RunConfig(name="recipe", threads=1)   # 1 thread: as fast as 2 here, and reproducible
    model: TrainModelConfig = TrainModelConfig()
    task: TaskConfig = TaskConfig()
    eval: EvalConfig = EvalConfig(every=100, size=400, pass_k=1)
    hard: HardSlice = HardSlice()
    final_eval: StageEval = StageEval()
    data: DataSection = DataSection()   # a prompt set (with model.hf_path): every stage trains on it (text_stages)
    stages: list[StageSpec] = Field(default_factory=list, description="the stages, in order: {name, kind, ...}")

    @model_validator(mode="after")
    def _check(self):
        if self.hard.operands <= self.task.max_operands:
            raise ValueError(f"hard.operands ({self.hard.operands}) must exceed task.max_operands "
                             f"({self.task.max_operands}): the harder slice has more operands than any training prompt")
        self.data.check("math", self.model.hf_path)
        if self.data.prompts is not None and self.model.hf_path is None:
            raise ValueError("data.prompts is a prompt set for a model with its own tokenizer: set model.hf_path=<dir> "
                             "(gpt_mini's stages train on the arithmetic task)")
        if self.model.hf_path is None:
            check_prompt_fits(self.task, self.model.max_seq_len, self.hard.operands, "hard.operands")
        else:
            n_pos = check_hf_path(self.model.hf_path).get("max_position_embeddings")
            own = next((s.kind for s in self.stages if s.kind != "train"), None)
            if own is not None and self.data.prompts is None:   # fail now, not after the stages before it trained
                check_char_stage_tokenizer(hf_tokenizer(self.model.hf_path), self.model.hf_path, own)
            if not own_tokenizer(self) and n_pos:   # the final evaluation's harder slice, as on gpt_mini
                check_prompt_fits(self.task, n_pos, self.hard.operands, "hard.operands")
        seen, policy, rm = set(), False, False
        for i, s in enumerate(self.stages):
            where = f"stages[{i}] {s.name!r}"
            if not _NAME.fullmatch(s.name) or s.name in type(self).model_fields:
                raise ValueError(f"stages[{i}].name {s.name!r}: use lowercase letters, digits and _, not one of the "
                                 f"shared sections ({', '.join(type(self).model_fields)})")
            if s.name in seen:
                raise ValueError(f"{where}: a second stage with this name; stage names must be unique")
            seen.add(s.name)
            if s.kind not in KINDS:
                raise ValueError(f"stages[{i}].kind {s.kind!r} is not a stage kind: use one of {', '.join(KINDS)}")
            for key in RUNNER_KEYS:
                if key in s.own():
                    raise ValueError(f"{where}: key {key!r} is set by the recipe runner (shared sections at the top, "
                                     "the previous stage's checkpoint as init_from): remove it from the stage")
            if s.kind in ("rm", "dpo", "rs_sft") and not policy:
                raise ValueError(f"{where} (kind {s.kind}) needs a policy stage before it (sft, dpo, train or "
                                 "rs_sft): it starts from the policy's weights")
            env = s.own().get("env", {}) if isinstance(s.own().get("env"), dict) else {}
            if s.kind == "train" and env.get("name") in RM_ENVS and not rm and "model_path" not in env:
                raise ValueError(f"{where}: env.name={env['name']} needs an rm stage before it (or env.model_path)")
            try:
                self.stage_job(i, "<previous stage>" if policy else None, "<rm stage>" if rm else None)
                if s.kind == "rs_sft":
                    check_rs_env(self.rs(i).env)
            except ConfigError as e:
                raise ValueError(f"{where} (kind {s.kind}): {str(e).removeprefix('invalid config (defaults): ')}") \
                    from None
            policy |= s.kind in MAKES_POLICY
            rm |= s.kind == "rm"
        return self

    @property
    def root(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def folder(self, i: int) -> str:
        return f"{i + 1}_{self.stages[i].name}"

    def stage_job(self, i: int, init: str | None, rm_dir: str | None, hf_dir: str | None = None) -> BaseModel:
        """The ordinary job that runs stage i: the stage's own keys over what every stage shares (the run folder
        runs/<run.name>/<i>_<name>/, the model, the task, the held-out eval, the previous stage's weights).
        On a Hugging Face policy the previous stage's weights are its save_pretrained directory `hf_dir` (None:
        model.hf_path itself): a train stage's model.hf_path; an sft / rm / dpo / rs_sft stage gets the policy
        from the runner, and its gpt_mini-shaped model section only carries the HF model's context length."""
        s = self.stages[i]
        cls, own = JOBS[s.kind], s.own()
        if s.kind == "rs_sft":
            own.pop("rs", None)   # the sampling's, not the SFT job's
        model = self.model.model_dump() if s.kind == "train" else self.model.gpt_mini().model_dump()
        if self.model.hf_path is not None:
            start = hf_dir or self.model.hf_path
            if s.kind == "train":
                model["hf_path"], init = start, None
            else:
                model["max_seq_len"] = check_hf_path(start).get("max_position_embeddings", model["max_seq_len"])
                init = start if s.kind in ("rm", "dpo") else None   # required there; a record, never loaded
        base = {"run": self.run.model_copy(update={"out_dir": str(self.root), "name": self.folder(i)}).model_dump(),
                "model": model, "init_from": init, "task": self.task.model_dump(),
                "eval": self.eval.model_copy(update={"pass_k": 1}).model_dump()}
        if self.data.prompts is not None:   # a train stage's prompts and env; the others get them from the runner
            base["data"], base["env"] = self.data.model_dump(), {"name": "math"}
        base = {k: v for k, v in base.items() if k in cls.model_fields}
        if s.kind == "train" and own.get("env", {}).get("name") in RM_ENVS and rm_dir is not None:
            base["env"] = {"model_path": rm_dir}
        if s.kind == "rs_sft":
            base["sft"] = {"data_file": f"<{self.folder(i)}.jsonl>"}
        if s.kind == "train":
            return load_train_job(None, [], base=deep_merge(base, own))
        return load_config(cls, None, [], base=deep_merge(base, own))

    def rs(self, i: int) -> RSConfig:
        """An rs_sft stage's `rs:` section (a ConfigError naming `rs.<key>` if it is wrong)."""
        try:
            return load_config(RSConfig, None, [], base=self.stages[i].own().get("rs", {}))
        except ConfigError as e:
            raise ConfigError("rs: " + str(e).removeprefix("invalid config (defaults): ")) from None


def stage_steps(kind: str, job: Any) -> int:
    """The steps that finish stage `kind`'s job (what --resume compares its latest checkpoint against)."""
    return {"sft": lambda: job.sft.steps, "rs_sft": lambda: job.sft.steps, "rm": lambda: job.rm.steps,
            "dpo": lambda: job.dpo.steps, "train": lambda: job.steps}[kind]()


def load_recipe(path: str | None, overrides: list[str]) -> RecipeJob:
    """The recipe file < overrides. `<stage name>.<key>=v` sets key <key> of that stage; other keys are shared."""
    if path is None:
        raise ConfigError("rlpt recipe needs a recipe file, e.g. rlpt recipe recipes/instructgpt.yaml")
    data = read_yaml(path)
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ConfigError(f"recipe {quote(path)}: `stages:` must be a non-empty list of {{name, kind, ...}} "
                          "sections, e.g. stages: [{name: sft, kind: sft}]")
    names = [s.get("name") for s in stages]
    shared, by_stage = [], {}
    for item in overrides:
        head = item.split("=", 1)[0].split(".", 1)
        if head[0] in names and len(head) == 2:
            by_stage.setdefault(head[0], []).append(item.split(".", 1)[1])
        elif head[0] in RecipeJob.model_fields and head[0] != "stages":
            shared.append(item)
        else:
            raise ConfigError(f"override {quote(item)}: {head[0]!r} is neither a shared section "
                              f"({', '.join(k for k in RecipeJob.model_fields if k != 'stages')}) nor a stage "
                              f"({', '.join(map(str, names))}); write <stage>.<key>=value for a stage's key")
    data = apply_overrides({k: v for k, v in data.items() if k != "stages"}, shared)
    data["stages"] = [apply_overrides(s, by_stage.get(s.get("name"), [])) for s in stages]
    src = quote(str(path)) + (" + overrides" if overrides else "")
    try:
        return load_config(RecipeJob, None, [], base=data)
    except ConfigError as e:
        raise ConfigError(str(e).replace("invalid config (defaults)", f"invalid recipe ({src})", 1)) from None


# -- running it -----------------------------------------------------------------------------------------------
def run_recipe(job: RecipeJob, resume: bool = False, allow_change: Collection[str] = ()) -> tuple[Path, list[dict]]:
    """Every stage in order, then the same evaluation of each policy stage's final weights.
    Returns (recipe folder, one row per policy stage)."""
    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    lock, _ = claim_folder(job.root)   # one recipe per folder, and never into a folder rlpt did not make
    try:
        return _run_stages(job, resume, allow_change)
    finally:
        lock.release()


def _run_stages(job: RecipeJob, resume: bool, allow_change: Collection[str]) -> tuple[Path, list[dict]]:
    root, clock, hf = job.root, StageClock(job.root, resume), job.model.hf_path is not None
    text = job.data.prompts is not None   # every stage on the prompt set, in the model's own tokenizer
    if hf:
        from rlpt.models.hf import load_hf_policy
    init = rm_dir = hf_dir = None     # hf_dir: on an HF policy, the previous policy stage's save_pretrained copy
    ckpts: dict[str, Path] = {}
    hf_dirs: dict[str, Path] = {}
    for i, spec in enumerate(job.stages):
        folder = job.folder(i)
        start = str(hf_dir or job.model.hf_path) if hf else None
        stage = job.stage_job(i, str(init) if init is not None else None, str(rm_dir) if rm_dir else None,
                              start)
        steps, t0 = stage_steps(spec.kind, stage), time.perf_counter()
        done = finished_checkpoint(root / folder, steps) if resume else None
        if spec.kind == "rs_sft" and done is None:
            demos = root / f"{folder}.jsonl"
            if not (resume and demos.exists()):
                if text:
                    policy = load_hf_policy(start)
                    task = TextTask(job.data, policy, job.rs(i).max_tokens, job.run.seed, "rs_sft")
                    stats = rejection_sample_text(policy, task, job.rs(i), job.run.seed, demos, job.run.progress)
                else:
                    load = (lambda d: load_char_policy(d, "rs_sft")) if hf else None
                    stats = rejection_sample(Path(start) if hf else init, job, i, demos, load)
                print(f"[rlpt] recipe: {folder} rejection sampling kept {stats['kept']} of {stats['samples']} "
                      f"samples ({stats['prompts_kept']} of {stats['prompts']} prompts) -> {demos}")
            stage = stage.model_copy(update={"sft": stage.sft.model_copy(update={"data_file": str(demos)})})
        run = {"sft": train_sft, "rs_sft": train_sft, "rm": train_rm, "dpo": run_dpo, "train": run_train}[spec.kind]

        def go(again, run=run, stage=stage, kind=spec.kind, start=start):
            kw = {}
            if hf and kind != "train":   # the HF policy in place of init_from's gpt_mini; its checkpoints say so
                kw = {"model" if kind in ("sft", "rs_sft") else "policy": load_hf_policy(start) if text else
                      load_char_policy(start, kind), "meta": hf_meta(start)}
            if text and kind != "train":   # the prompt set's data, env and tokenizer in place of the arithmetic task's
                kw.update(text_stage_kwargs(job.data, job.run.seed, job.run.progress, kind, stage,
                                            kw.get("model", kw.get("policy"))))
            return run(stage, resume=again, allow_change=allow_change, **kw)
        ck = run_job_stage(f"{folder} ({spec.kind})", root / folder, steps, go, resume)
        if done is None:
            clock.add(folder, t0)
        if spec.kind == "rm":
            rm_dir = root / folder
        else:
            init = ckpts[folder] = ck
            if hf:   # the next stage starts from this directory; a stage run again writes it again
                out = root / folder / "hf"
                if done is None or not (out / "config.json").is_file():
                    save_stage_policy(stage, start, ck, out)
                hf_dir = hf_dirs[folder] = out
    t0 = time.perf_counter()
    if not hf:
        rows = evaluate_checkpoints(ckpts, job.model.gpt_mini(), job.task, job.eval, job.hard, job.final_eval,
                                    job.run.seed)
    elif not own_tokenizer(job):   # every stage on gpt_mini's characters: the same evaluation, of each directory
        rows = evaluate_checkpoints(hf_dirs, job.model.gpt_mini(), job.task, job.eval, job.hard, job.final_eval,
                                    job.run.seed, load=load_char_policy)
    else:   # a prompt set scored as text: each stage's own last held-out evaluation stands
        rows = [hf_row(folder, ck, hf_dirs.get(folder)) for folder, ck in ckpts.items()]
    for r in rows:
        r["seconds"] = clock.seconds.get(r["stage"], 0.0)
    (root / "stages.json").write_text(json.dumps(rows, indent=1))
    write_recipe_report(job, rows, sum(clock.seconds.values()), time.perf_counter() - t0)
    return root, rows


def own_tokenizer(job: RecipeJob) -> bool:
    """Whether this recipe runs an HF policy on text in its own tokenizer (data.prompts, or a train stage's
    env.name=math): then it has no character-level task every stage can be evaluated on."""
    return job.model.hf_path is not None and (job.data.prompts is not None or any(
        s.kind == "train" and (s.own().get("env") or {}).get("name") in ANY_TOKENIZER_ENVS for s in job.stages))


def recipe_table(job: RecipeJob, rows: list[dict]) -> str:
    fe = StageEval(samples=0) if own_tokenizer(job) else job.final_eval
    return stage_table(rows, job.task, job.eval.size, job.hard, fe)


def write_recipe_report(job: RecipeJob, rows: list[dict], train_s: float, eval_s: float) -> Path:
    order = " → ".join(f"{s.name} ({s.kind})" for s in job.stages)
    parts = [f"# Recipe {job.run.name}: {order}", "", f"Measured on {machine()}.", "", recipe_table(job, rows), "",
             f"Wall clock: {train_s:.0f} s for the stages (seconds column: each stage, summed over the invocations "
             f"that ran it), {eval_s:.0f} s for this evaluation.", ""]
    if not own_tokenizer(job):
        png = plot_stage_rows(rows, job.hard, job.final_eval, job.root / "stages.png")
        parts += [f"![accuracy after each stage]({png.name})", ""]
    path = job.root / "report.md"
    path.write_text("\n".join(parts))
    return path
