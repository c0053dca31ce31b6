"""`rlpt train`: build the six roles from a recipe, run the controller, keep the run folder.

    rlpt train recipes/grpo_arith.yaml [key=value ...] [--resume]
    rlpt train algorithm.name=ppo [key=value ...]       any registered algorithm, with its own defaults

The job's schema (TrainJob, and TrainStage: the part a pipeline's RL stage shares) opens this file.
The run folder's config.yaml holds every value the run used, the algorithm's included: its section is
validated by the algorithm it names and resolved against the rollout (e.g. norm_len = max_tokens).

The recipe starts from `init_from` (an SFT checkpoint or run folder); when none is given, it first
trains one with the recipe's `sft:` section into `runs/<name>/sft/` (kept short on purpose: RL
needs a policy that is right sometimes, not always). The SFT weights become three separate
copies: the trainer's policy, the rollout's copy (updated only by weight sync) and the frozen
reference. Checkpoints hold the trainer, the rollout copy, the env's and every generator's state,
so `--resume` continues bit-identically.

With `model.hf_path=<dir>` (e.g. `rlpt export` output) the policy is that Hugging Face model instead, with
LoRA when `lora.r > 0`: π_ref is then the same model with its adapters off, the rollout's copy shares the frozen
base and a sync moves the adapters only (`lora.sync`), and checkpoints hold the adapters only (docs/real_models.md
§5). No SFT start is trained. On the arithmetic envs its tokenizer must be gpt_mini's; env.name=math runs it with
its own tokenizer over a prompt set of yours (`data.prompts`, `data.format=rows|gsm8k|math`, `data.chat_template`).
"""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, SerializationInfo, ValidationInfo, field_serializer, field_validator, model_validator

import rlpt.algorithms  # noqa: F401 - registers the algorithms
import rlpt.envs  # noqa: F401 - registers the environments beyond arithmetic
import rlpt.preference  # noqa: F401 - registers the reward_model env
from rlpt.checkpoint import finished_checkpoint, latest_checkpoint, load_state, load_weights
from rlpt.config import (
    DEFAULTS,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    Section,
    SFTConfig,
    TaskConfig,
    apply_overrides,
    check_prompt_fits,
    deep_merge,
    load_config,
    lookup,
    quote,
    read_yaml,
)
from rlpt.envs.curriculum import CurriculumConfig, curriculum_kwargs
from rlpt.framework.agent_loop import MultiTurnRollout
from rlpt.framework.algorithm import ALGORITHMS, AlgorithmConfig, AlgorithmConfigError, make_algorithm
from rlpt.framework.controller import Controller
from rlpt.framework.environment import env_class, make_env
from rlpt.framework.evaluate import evaluate
from rlpt.framework.lagged_sync import LaggedSyncer
from rlpt.framework.reference import Reference
from rlpt.framework.rollout import Rollout
from rlpt.framework.trainer import Trainer
from rlpt.framework.weight_sync import WeightSyncer
from rlpt.gpt_mini.generate import SamplingParams
from rlpt.gpt_mini.task import TRACE_FORMATS, make_task
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.hf_policy import (  # noqa: F401 - re-exported: a Hugging Face policy through rlpt train
    ANY_TOKENIZER_ENVS,
    HF_ARCHITECTURES,
    DataSection,
    LoraSection,
    TrainModelConfig,
    check_char_tokenizer,
    check_hf_path,
    checkpointed,
    env_tokenizer,
    load_policy,
    prompt_set_kwargs,
    rollout_policy,
    set_grad_checkpointing,
    sync_payload,
)
from rlpt.loop import train_loop
from rlpt.optim import make_optimizer
from rlpt.report import LAST10, PROGRESS, summarize  # noqa: F401 - the end-of-run table, re-exported
from rlpt.run import Run, rng_state, set_rng_state
from rlpt.sft import SFTJob, check_demonstration_fits, train_sft
from rlpt.systems.config import SystemConfig


class EnvConfig(Section):
    name: str = "arithmetic"
    model_path: str | None = Field(None, description="checkpoint or run folder of the model an env scores with "
                                   "(reward_model: an `rlpt rm` run; judge: an SFT checkpoint)")
    curriculum: CurriculumConfig = Field(CurriculumConfig(), description="env.name=curriculum only: the online "
                                         "curriculum and operand ramp (rlpt/envs/curriculum.py)")
    process_coef: float = Field(0.5, ge=0, lt=1, description="env.name=prm only: c in R = 1[verifier] − c·mean_k(1 − "
                                "PRM step score) (rlpt/envs/prm.py); below 1 so that reward > 0 still means correct")
    format_coef: float = Field(0.5, ge=0, lt=1, description="env.name=format only: c in R = accuracy − c·(1 − "
                               "well_formed) (rlpt/envs/format_reward.py); below 1 so that reward > 0 still means "
                               "correct")


class RolloutConfig(Section):
    k: int = Field(8, ge=1, description="samples per prompt (the group)")
    prompts_per_step: int = Field(32, ge=1, description="B prompts per step")
    temperature: float = Field(0.7, gt=0, description="the trainer and reference score at the same temperature")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_tokens: int = Field(32, ge=1, description="response tokens per trajectory (multi-turn: tool output included)")
    max_turns: int = Field(4, ge=1, description="assistant turns per trajectory (multi-turn envs only)")
    turn_tokens: int = Field(0, ge=0, description="tokens per assistant turn (multi-turn envs only); 0 = max_tokens")
    backend: Literal["engine", "simple", "vllm"] = Field(
        "engine", description="sampler: 'engine' (rlpt.engine: paged KV, continuous batching, one prefill per "
                              "group), 'simple' (rlpt.gpt_mini.generate: padded batches, dense KV cache) or 'vllm' "
                              "(a real vLLM, the optional extra for CUDA machines: rlpt/engine/vllm_backend.py)")
    verify_workers: int = Field(0, ge=0, description="verifier processes (lesson 28): 0 = verify inline after "
                                "sampling; N = a pool of N processes verifying each sequence the moment the engine "
                                "finishes it, overlapped with the rest of the sampling (rlpt/framework/dispatch.py)")
    verify_timeout: float = Field(30.0, gt=0, description="seconds one verify may take in the pool "
                                  "(verify_workers > 0); past it the reward is 0 and verify/timeouts counts it")


class TrainerConfig(Section):
    optim: OptimConfig = OptimConfig(lr=5e-5, warmup_steps=0, schedule="cosine")
    micro_batch_size: int = Field(0, ge=0, description="rows per forward/backward chunk; 0 = whole mini-batch")
    mini_batches: int = Field(2, ge=1, description="optimizer steps per epoch over the rollout batch")
    epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    # on by default: 1.2-1.3x the padded train step on the recipe's rollouts (bench/packing.py), gradients equal
    # to fp32 rounding (tests/test_packing.py), the log-prob check and resume unchanged
    packing: bool = Field(True, description="pack each micro-batch's rows end to end (no FLOP on padding; "
                          "gpt_mini without a critic; else length-bucketed micro-batches); the reference too")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: CPU autocast on the trainer's and the reference's forward (fp32 master weights "
                            "and AdamW); the log-prob check then uses check.logp_tol_bf16")
    grad_checkpointing: bool = Field(False, description="recompute each block's activations in backward instead of "
                                     "keeping them (gpt_mini: torch.utils.checkpoint per block; HF: its own): "
                                     "same gradients, less activation memory, one more forward")


class SyncConfig(Section):
    every: int = Field(1, ge=1, description="sync rollout weights every N train steps")
    lag: int = Field(0, ge=0, description="sample with the weights of exactly N train steps ago, every step "
                     "(rlpt.framework.lagged_sync: a deterministic async staleness); 0 = off")

    @model_validator(mode="after")
    def _lag(self):
        if self.lag and self.every != 1:
            raise ValueError(f"sync.lag={self.lag} with sync.every={self.every}: the lag already sets which weights "
                             "the rollout holds; set sync.every=1")
        return self


class CheckConfig(Section):
    """Right after a sync, trainer log-probs must equal old_logp. fp32 kernels of different shapes
    (cached decode vs full forward) differ by ~1e-7 typically and up to ~1e-5 on rare low-probability
    tokens, so the mean is held to 1e-5 and the worst token to 1e-3; a real bug (temperature on one
    side, dropout, an off-by-one) moves the mean by orders of magnitude more."""
    logp_tol: float = Field(1e-5, gt=0, description="limit on the mean |trainer logp − old_logp|")
    logp_tol_max: float = Field(1e-3, gt=0, description="limit on the worst token")
    # bf16 autocast on the trainer against the fp32 sampler: the log-probs differ by 1.5e-3 per token on average
    # (gpt_mini, bench/packing.py; 3.1e-3 on a 26M Llama, research wave2 §4.4) and up to 0.12 on a rare
    # low-probability token (4 steps of the grpo_arith recipe): 0.1 would stop healthy runs; a real bug moves
    # the mean by far more than 1e-2
    logp_tol_bf16: float = Field(1e-2, gt=0, description="limit on the mean |Δ| when trainer.precision=bf16")
    logp_tol_max_bf16: float = Field(0.5, gt=0, description="limit on the worst token when trainer.precision=bf16")
    enabled: bool = True


DEFAULT_ALGORITHM = "grpo"


class TrainStage(Section):
    """What RL does, step by step: the keys of `rlpt train` that the pipeline's RL stage takes too (its `rl:`
    section is a TrainStage; rlpt.pipeline adds the run, model, task and start it shares with the other stages)."""
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = Field(
        default_factory=lambda: {"name": DEFAULT_ALGORITHM}, validate_default=True,
        description="`name`: a registered algorithm; the other keys are that algorithm's Config")
    trainer: TrainerConfig = TrainerConfig()
    sync: SyncConfig = SyncConfig()
    check: CheckConfig = CheckConfig()
    steps: int = Field(300, ge=1)
    ckpt_every: int = Field(25, ge=1)
    keep_checkpoints: int = Field(2, ge=1)

    @field_validator("algorithm", mode="before")
    @classmethod
    def _algorithm(cls, section, info: ValidationInfo) -> AlgorithmConfig:
        """Validated by the algorithm it names (errors name `algorithm.<key>`) and resolved against the rollout
        (norm_len = rollout.max_tokens, ...), so the run folder's config.yaml holds every value the run used."""
        if isinstance(section, AlgorithmConfig):
            section = section.model_dump()
        if not isinstance(section, dict):
            raise ValueError(f"algorithm must be a section, e.g. algorithm.name={DEFAULT_ALGORITHM} (got {section!r})")
        r = info.data.get("rollout") or RolloutConfig()   # absent when rollout is invalid: that error is reported
        try:
            return make_algorithm(section, r.k, r.max_tokens).cfg
        except AlgorithmConfigError as e:
            raise ValueError(str(e)) from None

    @field_serializer("algorithm")
    def _dump_algorithm(self, cfg: AlgorithmConfig, info: SerializationInfo) -> dict:
        # as load_config's defaults only the name: the other keys are those of whichever algorithm a recipe names
        return {"name": cfg.name} if info.context == DEFAULTS else cfg.model_dump(mode=info.mode)


class TrainJob(TrainStage):
    """`rlpt train`'s schema: the stage, and what it runs on (run folder, model, task, env, start, eval)."""
    run: RunConfig = RunConfig(name=DEFAULT_ALGORITHM)
    model: TrainModelConfig = TrainModelConfig()
    lora: LoraSection = LoraSection()
    task: TaskConfig = TaskConfig()
    env: EnvConfig = EnvConfig()
    data: DataSection = DataSection()   # a prompt set of your own for env.name=math (docs/real_models.md)
    init_from: str | None = None
    sft: SFTConfig = SFTConfig(steps=180, format="cot")
    eval: EvalConfig = EvalConfig(every=25, size=400)
    system: SystemConfig = SystemConfig()   # where the roles run: in-process (colocated) or Ray actors

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, model):
        # a pipeline hands its ModelConfig (gpt_mini only) to its RL stage
        return model.model_dump() if isinstance(model, ModelConfig) and not isinstance(model, TrainModelConfig) \
            else model

    @model_validator(mode="after")
    def _hf(self):
        if self.lora.r and self.model.hf_path is None:
            raise ValueError(f"lora.r={self.lora.r} needs model.hf_path: LoRA adapts a Hugging Face policy (gpt_mini "
                             "trains fully); set model.hf_path=<dir> or lora.r=0")
        if self.model.hf_path is None:
            return self
        n_pos = check_hf_path(self.model.hf_path).get("max_position_embeddings")
        if n_pos is not None:   # the HF model's context, not model.max_seq_len, bounds the prompts
            try:
                check_prompt_fits(self.task, int(n_pos))
            except ValueError as e:
                raise ValueError(f"model.hf_path={self.model.hf_path!r} (max_position_embeddings={n_pos}): "
                                 f"{e}") from None
        if self.init_from is not None:
            raise ValueError("init_from and model.hf_path are both set: the HF directory is the start; remove one")
        return self   # every system.topology: Ray actors load model.hf_path themselves (rlpt.systems.workers)

    @model_validator(mode="after")
    def _lag(self):
        if self.sync.lag and self.system.topology != "colocated":
            raise ValueError(f"sync.lag={self.sync.lag} is the in-process stand-in for async staleness; with "
                             f"system.topology={self.system.topology} use system.max_staleness, and sync.lag=0")
        return self

    @model_validator(mode="after")
    def _env(self):
        try:
            env_model_kwargs(self.env)
        except KeyError as e:
            raise ValueError(str(e.args[0])) from None
        if self.sft.format == "tool" and self.init_from is None \
                and not env_class(self.env.name).multi_turn:
            raise ValueError(f"sft.format=tool trains a tool user, but env.name={self.env.name!r} runs no tool: "
                             "set env.name=calculator, or sft.format=direct / cot")
        taught = env_sft_format(self.env.name)
        if taught is not None and self.init_from is None and self.sft.format != taught:
            # a start never shown the tool never calls it: 0 calls at every step, a run that means nothing
            raise ValueError(f"env.name={self.env.name} needs a policy that uses its tool, but the SFT start "
                             f"(sft.format={self.sft.format}) never shows a tool call: set sft.format={taught}, or "
                             f"init_from=<a run of `rlpt sft sft.format={taught}`>")
        if self.env.name in NEEDS_HF_POLICY:
            raise ValueError(f"env.name={self.env.name} scores {NEEDS_HF_POLICY[self.env.name]}, which gpt_mini (the "
                             "policy `rlpt train` builds) cannot write in its arithmetic alphabet: every reward would "
                             "be 0 and every step skipped. Use the env from Python with a Hugging Face policy "
                             "(rlpt.models.hf), or pick env.name=arithmetic, calculator, math, leaky, reward_model "
                             "or judge")
        if self.model.hf_path is None:   # else checked against the HF model's context in _hf
            check_prompt_fits(self.task, self.model.max_seq_len)
        if self.init_from is None and self.model.hf_path is None:   # the SFT start is trained here
            check_demonstration_fits(self.task, self.sft.format, self.model.max_seq_len)
        self.data.check(self.env.name, self.model.hf_path)
        own_tokenizer = self.model.hf_path is not None and self.env.name in ANY_TOKENIZER_ENVS
        if env_class(self.env.name).model_path_arg is None and not own_tokenizer:   # cheap to build: its prompts
            check_env_prompts(self)   # (an HF tokenizer's prompts are checked in build, against the model's context)
        return self


# envs whose answers gpt_mini's alphabet (digits, `+-*/=,()<>#`, lowercase, space, `.`) cannot write: no newline,
# `:`, quotes or brackets, so no program it samples passes a test
NEEDS_HF_POLICY = {"code": "Python programs against hidden tests"}


def env_sft_format(env: str) -> str | None:
    """The SFT trace format that teaches env `env`'s tool (calculator: 'tool'), None for an env without one."""
    return next((name for name, tf in TRACE_FORMATS.items() if tf.env == env), None)


def check_env_prompts(job: TrainJob) -> None:
    """The env's prompts must be text gpt_mini can write, with room to answer: a prompt its arithmetic
    alphabet cannot encode becomes an empty one (CodeEnv), and every RL step would be skipped."""
    tok = CharTokenizer()
    env = make_env(job.env.name, task=make_task(job.task), seed=0, tokenizer=tok,
                   **curriculum_kwargs(job.env.name, job.env.curriculum), **prompt_set_kwargs(job))
    for p in env.heldout(8):
        if not p.ids:
            raise ValueError(f"env.name={job.env.name} asks {quote(p.text, 60)}, which gpt_mini's arithmetic "
                             "alphabet cannot write (every prompt would be empty): it needs a Hugging Face policy "
                             "with its own tokenizer, model.hf_path=<dir>, which `rlpt train` runs with env.name="
                             f"{' / '.join(ANY_TOKENIZER_ENVS)} (docs/real_models.md, \"Your own model and data\")")
        if len(p.ids) >= job.model.max_seq_len:
            raise ValueError(f"env.name={job.env.name} asks prompts of {len(p.ids)} tokens but model.max_seq_len="
                             f"{job.model.max_seq_len} leaves no room to answer: raise model.max_seq_len")


def env_model_kwargs(env: EnvConfig) -> dict:
    """`env.model_path` as the keyword its env takes (`model_path_arg`: the RM env's model_path, the
    judge's judge_path); an env that needs a model and got none, or got one it cannot use, is an error."""
    arg = env_class(env.name).model_path_arg
    extra = curriculum_kwargs(env.name, env.curriculum) | coef_kwargs(env)
    if arg is None:
        if env.model_path is not None:
            raise ValueError(f"env.model_path is set but env '{env.name}' scores without a model: "
                             "remove env.model_path or pick an env that takes one (reward_model, judge)")
        return extra
    if env.model_path is None:
        raise ValueError(f"env '{env.name}' needs a model: set env.model_path=<checkpoint or run folder>")
    return {arg: env.model_path, **extra}


COEF_ENVS = {"process_coef": ("prm", "process reward"), "format_coef": ("format", "format reward")}


def coef_kwargs(env: EnvConfig) -> dict:
    """`env.process_coef` for env.name=prm, `env.format_coef` for env.name=format; either set to another value
    for any other env is an error naming the key."""
    out = {}
    for key, (name, what) in COEF_ENVS.items():
        if env.name == name:
            out[key] = getattr(env, key)
        elif getattr(env, key) != EnvConfig.model_fields[key].default:
            raise ValueError(f"env.{key} is set but env.name={env.name} has no {what}: set env.name={name} "
                             f"or remove env.{key}")
    return out


def load_train_job(path: str | None, overrides: list[str], base: dict | None = None) -> TrainJob:
    """defaults < the algorithm's own defaults (and a tool env's SFT format: calculator -> sft.format=tool) < base
    < the recipe < overrides. The algorithm's own (the one the
    recipe or the overrides name): its `trainer_defaults` (PPO: trainer.epochs=4) and run.name = its name, so
    `rlpt train algorithm.name=ppo` runs PPO as PPO is meant to run, into runs/ppo."""
    layers = [base or {}, read_yaml(path) if path else {}]
    name = str(lookup(["algorithm", "name"], DEFAULT_ALGORITHM, layers, overrides))
    defaults = algorithm_defaults(name)
    taught = env_sft_format(str(lookup(["env", "name"], "arithmetic", layers, overrides)))
    if taught and lookup(["sft", "format"], None, layers, overrides) is None:   # a tool env's SFT start shows the tool
        defaults = deep_merge(defaults, {"sft": {"format": taught}})
    return load_config(TrainJob, path, overrides, base=deep_merge(defaults, base or {}))


def algorithm_defaults(name: str) -> dict:
    """The defaults `name` brings to a TrainJob, as data: run.name = name, and its own overrides."""
    return apply_overrides({"run": {"name": name}}, algorithm_overrides(name))


def algorithm_overrides(name: str) -> tuple[str, ...]:
    """A registered algorithm's own defaults, as overrides: its `trainer_defaults` (PPO: trainer.epochs=4);
    none for an unknown name (validation then names it)."""
    return ALGORITHMS[name].trainer_defaults if name in ALGORITHMS else ()


def sft_init(job: TrainJob, resume: bool, allow_change: Collection[str] = ()) -> Path:
    """The SFT checkpoint RL starts from: `init_from`, or one trained now into runs/<name>/sft."""
    if job.model.hf_path:
        return Path(job.model.hf_path)
    if job.init_from:
        return Path(job.init_from)
    sft_dir = Path(job.run.out_dir) / job.run.name / "sft"
    done = finished_checkpoint(sft_dir, job.sft.steps)
    if done is not None:
        return done
    ck = latest_checkpoint(sft_dir)
    sft_job = SFTJob(run=job.run.model_copy(update={"out_dir": str(sft_dir.parent), "name": "sft"}),
                     model=job.model.gpt_mini(), task=job.task, sft=job.sft,
                     eval=job.eval.model_copy(update={"pass_k": 1}))
    print(f"[rlpt] no init_from: training the SFT start ({job.sft.steps} steps) into {sft_dir}")
    train_sft(sft_job, resume=ck is not None, allow_change=allow_change)
    return latest_checkpoint(sft_dir)


def build(job: TrainJob, init: Path):
    """The six roles, wired. Returns (controller, heldout prompts)."""
    policy = load_policy(job, init, CharTokenizer())
    tok = env_tokenizer(job, policy, CharTokenizer())   # an HF model's own on env.name=math, else CharTokenizer
    if job.trainer.grad_checkpointing:   # only the trainer's train-mode forward recomputes; copies inherit the flag
        set_grad_checkpointing(policy)
    env = make_env(job.env.name, task=make_task(job.task), seed=job.run.seed, tokenizer=tok,
                   **env_model_kwargs(job.env), **prompt_set_kwargs(job, tok, policy.cfg.max_seq_len))
    sp = SamplingParams(max_tokens=job.rollout.max_tokens, temperature=job.rollout.temperature,
                        top_p=job.rollout.top_p, top_k=job.rollout.top_k)
    algo = make_algorithm(job.algorithm.model_dump(), job.rollout.k, job.rollout.max_tokens)
    critic = algo.make_critic(policy)   # None but for an algorithm with a value model (PPO); an HF policy's critic
    # is its decoder + a value head, under LoRA its own adapters on the policy's frozen base (rlpt.framework.critic)
    # an env that answers turns (`multi_turn`, e.g. the calculator) gets the agent loop; same interface
    multi = {"max_turns": job.rollout.max_turns, "turn_tokens": job.rollout.turn_tokens} \
        if env.multi_turn else {}
    rollout = (MultiTurnRollout if multi else Rollout)(
        rollout_policy(job, policy), tok, job.rollout.prompts_per_step, sp, seed=job.run.seed,
        group_filter=algo.group_filter, **multi)
    rollout.use_backend(job.rollout.backend)
    rollout.use_verifier(job.rollout.verify_workers, job.rollout.verify_timeout)
    scorers = {"values": critic} if critic is not None else {}   # V_old (PPO), scored before any update
    if algo.uses_prox:   # an off-policy correction: the trainer's log-probs before the update are π_prox
        scorers["prox_logp"] = Reference.prox_scorer(policy, job.rollout.temperature, job.trainer.precision)
    # β = 0 and no other reader of π_ref: its forward is skipped (issue 14, "do less")
    # under LoRA π_ref is the same model with the adapters off (no second copy), else a frozen deep copy
    ref_model = policy
    if job.lora.r:
        from rlpt.models.lora import AdapterDisabled
        ref_model = AdapterDisabled(policy)
    reference = Reference(ref_model, temperature=job.rollout.temperature, scorers=scorers,
                          ref_logp=algo.uses_reference, packing=job.trainer.packing, precision=job.trainer.precision)
    t = job.trainer
    total_opt_steps = job.steps * t.epochs * t.mini_batches
    trained = policy if critic is None else torch.nn.ModuleList([policy, critic])   # one optimizer for both
    opt, sched = make_optimizer(trained, t.optim, total_opt_steps)
    trainer = Trainer(policy, opt, sched, t.optim.grad_clip, t.micro_batch_size, t.mini_batches, t.epochs,
                            temperature=job.rollout.temperature, seed=job.run.seed, critic=critic,
                            packing=t.packing, precision=t.precision)
    exact = job.rollout.top_p == 1.0 and job.rollout.top_k == 0   # else old_logp is from a truncated dist
    sfx = "_bf16" if t.precision == "bf16" else ""   # bf16 has its own limits: check.logp_tol_bf16, ...
    keys = (f"check.logp_tol{sfx}", f"check.logp_tol_max{sfx}")
    tol, tol_max = (getattr(job.check, k.removeprefix("check.")) for k in keys)
    syncer = LaggedSyncer(job.sync.lag) if job.sync.lag else WeightSyncer(job.sync.every, sync_payload(job))
    ctl = Controller(rollout, env, reference, algo, trainer, syncer, job.rollout.k,
                     tok.pad_id, logp_tol=tol if job.check.enabled and exact else None, logp_tol_max=tol_max,
                     tol_keys=keys)
    return ctl, env.heldout(job.eval.size)


def run_train(job: TrainJob, resume: bool = False, allow_change: Collection[str] = ()) -> tuple[Controller, Run, dict]:
    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    if job.rollout.backend == "vllm":       # a missing vLLM: one line now, not after the SFT start is trained
        from rlpt.engine.vllm_backend import import_vllm
        import_vllm()
    torch.manual_seed(job.run.seed)
    run = Run(job.run.out_dir, job.run.name, job, resume=resume, allow_change=allow_change)   # locked first:
    try:                                                   # the SFT start is trained inside it
        init = sft_init(job, resume, allow_change)
        ctl, heldout = build(job, init)
        if job.system.topology != "colocated":   # the same roles as Ray actors (rlpt.systems), in ctl's place
            from rlpt.systems.runner import RaySystem
            ctl = RaySystem(job, build, init, local=ctl)
    except BaseException:
        run.abandon()   # a failed start leaves no new run folder behind (one with a trained SFT start stays)
        raise
    start = 0
    ck = run.resume_from
    if ck is not None:
        load_weights(ck, checkpointed(job, ctl.trainer.model)[0])
        state = load_state(ck)
        ctl.load_state_dict(state)
        set_rng_state(state["rng"])
        start = state["step"]
        run.keep_metrics(start, state.get("metrics_rows"))
        print(f"[rlpt] resumed {run.dir} from {ck.name} (step {start})")
    meta = checkpointed(job, ctl.trainer.model)[1]

    def save(step: int):
        state = {"step": step, "init": str(init), **ctl.state_dict(), "rng": rng_state()}
        # ctl.trainer.model read at each save: a Ray run's local copy is refreshed from the trainer actor on read
        return run.save(step, checkpointed(job, ctl.trainer.model)[0], meta, state, keep=job.keep_checkpoints)

    def eval_fn() -> dict:
        r = job.rollout   # greedy, on the trainer's weights, with the rollout's budget, sampler and turns
        ev = evaluate(ctl.trainer.model, ctl.env, heldout, r.max_tokens, backend=r.backend, max_turns=r.max_turns,
                      turn_tokens=r.turn_tokens)
        # acc/heldout is scored by the env's reward; acc/heldout_honest by its info["correct"] (they part
        # ways only under a hackable verifier such as `leaky`); tool/* when the env runs a tool
        named = {"acc_honest": "acc/heldout_honest", "tool_calls": "tool/calls_heldout",
                 "tool_errors": "tool/errors_heldout"}
        return {"acc/heldout": ev["acc"], "response/len_heldout": ev["len"],
                **{named[k]: v for k, v in ev.items() if k in named}}

    if start == 0:
        run.log(0, eval_fn())
    train_loop(run, start, job.steps, lambda step: ctl.step(), eval_fn, save, job.eval.every, job.ckpt_every,
               job.run.progress, desc=job.algorithm.name, show=PROGRESS)
    if job.system.topology != "colocated":
        ctl.close()
    final = summarize(run.read_metrics())
    run.finish()
    run.close()
    return ctl, run, final
