"""Supervised fine-tuning of gpt_mini on the arithmetic task: the policy RL starts from.

    loss = − Σ_t mask_t · log π(y_t | x, y_<t) / Σ_t mask_t      (mask = 1 on response tokens only)

The prompt is context, not a target: predicting `<3+4+5>` would only teach the model the prompt
distribution. A trace format (`sft.format=tool`, registered by `rlpt.envs.calculator`) brings its
own per-character mask: the calculator's reply `=1368#` is mask 0, so the model learns to call the tool
and to read its reply, never to predict it (spec part 1 §10.6 trap 1); its held-out evaluation runs the
tool in the agent loop. AdamW with linear warmup then cosine (or linear) decay; held-out greedy accuracy every
`eval.every` steps and pass@k at the end. Checkpoints hold weights, optimizer, schedule, RNG and the
data sampler's state, so `--resume` continues bit-identically.

    rlpt sft                                  # embedded defaults
    rlpt sft recipes/sft_arith.yaml sft.steps=300 sft.format=cot run.name=sft_cot
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlpt.config import ConfigError, EvalConfig, ModelConfig, OptimConfig, SFTJob, TaskConfig
from rlpt.gpt_mini.generate import SamplingParams, generate
from rlpt.gpt_mini.model import GPT, GPTConfig
from rlpt.gpt_mini.task import ArithmeticTask, Problem, verify
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.loop import train_loop
from rlpt.run import CheckpointError, Run, load_weights, read_checkpoint_meta, resolve_checkpoint, \
    restore_training, training_state


# -- building blocks shared with the RL side ---------------------------------------------------------
def make_task(cfg: TaskConfig) -> ArithmeticTask:
    return ArithmeticTask(**cfg.model_dump())


def make_model(cfg: ModelConfig, tok: CharTokenizer) -> GPT:
    return GPT(GPTConfig(vocab_size=tok.vocab_size, **cfg.model_dump()))


def load_model(path, expect: ModelConfig | None = None, tok: CharTokenizer | None = None) -> GPT:
    """Build gpt_mini from a checkpoint's stored config and load its weights.

    With `expect`, a config whose shape differs from the checkpoint's is an error naming the keys.
    """
    path = resolve_checkpoint(path)
    meta = read_checkpoint_meta(path)
    if expect is not None:
        want = GPTConfig(vocab_size=(tok or CharTokenizer()).vocab_size, **expect.model_dump()).to_dict()
        diff = [f"model.{k}: checkpoint {meta.get(k)!r} vs config {v!r}" for k, v in want.items() if meta.get(k) != v]
        if diff:
            raise CheckpointError(f"checkpoint {str(path)!r} was trained with a different model than the config "
                                  f"describes ({'; '.join(diff)}). Set those keys to the checkpoint's values "
                                  "or start from a matching checkpoint.")
    try:
        model = GPT(GPTConfig(**meta))
    except TypeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} stores an unknown model config: {e}") from None
    load_weights(path, model)
    return model


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:   # step counts optimizer steps taken so far
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# -- response formats with their own mask and evaluation (registered from above, like envs) ---------
@dataclass(frozen=True)
class TraceFormat:
    """A demonstration format whose response carries a per-character loss mask (0 = text the policy
    does not produce, e.g. a tool's reply) and, when answering takes more than one decode, its own
    held-out evaluation `evaluate(model, tok, problems, eval_cfg, pass_k, seed) -> {"acc", "len", ...}`;
    `check(problems, eval_cfg)` raises ConfigError before training when the eval could not work."""
    trace: Callable[[Problem], tuple[str, list[float]]]
    evaluate: Callable[..., dict] | None = None
    check: Callable[..., None] | None = None


TRACE_FORMATS: dict[str, TraceFormat] = {}


def register_trace_format(name: str, trace: Callable[[Problem], tuple[str, list[float]]],
                          evaluate: Callable[..., dict] | None = None,
                          check: Callable[..., None] | None = None) -> None:
    TRACE_FORMATS[name] = TraceFormat(trace, evaluate, check)


def trace_format(fmt: str) -> TraceFormat | None:
    """None for the plain formats ('direct', 'cot'); else the registered format, or an error naming the key."""
    if fmt in ("direct", "cot"):
        return None
    if fmt not in TRACE_FORMATS:
        raise ConfigError(f"sft.format={fmt!r} is not registered (known: 'direct', 'cot', {sorted(TRACE_FORMATS)}); "
                         "trace formats such as 'tool' are registered by importing rlpt.envs")
    return TRACE_FORMATS[fmt]


def sft_batch(problems: list[Problem], fmt: str, tok: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids (B, T) right-padded, loss_mask (B, T-1) = 1 where the target is a response token
    (and, for a trace format, one its mask keeps: a tool's reply is context, not a target)."""
    tf = trace_format(fmt)
    seqs = []
    for p in problems:
        text, m = tf.trace(p) if tf else (p.response(fmt), None)
        b = tok.encode(text)
        if m is not None and len(m) != len(b):
            raise ValueError(f"sft.format={fmt!r}: the trace's mask has {len(m)} entries for {len(b)} tokens "
                             "(a per-character mask needs the character tokenizer)")
        seqs.append((tok.encode(p.prompt), b, m))
    T = max(len(a) + len(b) for a, b, _ in seqs)
    ids = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1)
    for i, (a, b, m) in enumerate(seqs):
        ids[i, :len(a) + len(b)] = torch.tensor(a + b)
        # target at column j is token j+1
        mask[i, len(a) - 1:len(a) + len(b) - 1] = 1.0 if m is None else torch.tensor(m)
    return ids, mask


def sft_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(ids)[:, :-1]                                              # (B, T-1, V)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return (nll.view_as(mask) * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def evaluate(model, tok: CharTokenizer, problems: list[Problem], cfg: EvalConfig, pass_k: int = 0,
             seed: int = 0, batch: int = 256) -> dict:
    """Greedy accuracy (and pass@k from k samples at temperature 1 when pass_k > 0)."""
    prompts = [tok.encode(p.prompt) for p in problems]
    greedy = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0)
    correct, lengths = 0.0, 0
    for i in range(0, len(prompts), batch):
        outs = generate(model, prompts[i:i + batch], greedy, tok.eos_id, tok.pad_id)
        for p, o in zip(problems[i:i + batch], outs):
            correct += verify(tok.decode(o.tokens), p.gold)
            lengths += len(o.tokens)
    out = {"acc": correct / len(problems), "len": lengths / len(problems)}
    if pass_k > 0:
        g = torch.Generator().manual_seed(seed)   # own generator: eval never perturbs training RNG
        sp = SamplingParams(max_tokens=cfg.max_tokens, temperature=1.0)
        rep = [p for p in prompts for _ in range(pass_k)]
        hits = []
        for i in range(0, len(rep), batch):
            hits += [verify(tok.decode(o.tokens), problems[(i + j) // pass_k].gold)
                     for j, o in enumerate(generate(model, rep[i:i + batch], sp, tok.eos_id, tok.pad_id, g))]
        out[f"pass@{pass_k}"] = sum(max(hits[j * pass_k:(j + 1) * pass_k]) for j in range(len(prompts))) / len(prompts)
    return out


def evaluate_format(model, tok: CharTokenizer, problems: list[Problem], cfg: EvalConfig, fmt: str,
                    pass_k: int = 0, seed: int = 0) -> dict:
    """`evaluate`, or the format's own evaluation (the tool format runs the calculator in the agent loop)."""
    tf = trace_format(fmt)
    if tf is not None and tf.evaluate is not None:
        return tf.evaluate(model, tok, problems, cfg, pass_k=pass_k, seed=seed)
    return evaluate(model, tok, problems, cfg, pass_k=pass_k, seed=seed)


# -- the SFT job ----------------------------------------------------------------------------------
def train_sft(job: SFTJob, resume: bool = False, model: GPT | None = None) -> tuple[GPT, Run, dict]:
    """Run SFT as a run folder; returns (model, run, final metrics)."""
    tf = trace_format(job.sft.format)   # an unregistered format fails here, before the run folder exists
    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    tok, task = CharTokenizer(), make_task(job.task)
    run = Run(job.run.out_dir, job.run.name, job, resume=resume)
    torch.manual_seed(job.run.seed)
    if model is None:
        model = load_model(job.init_from, job.model, tok) if job.init_from else make_model(job.model, tok)
    opt, sched = make_optimizer(model, job.sft.optim, job.sft.steps)
    data_rng = random.Random(job.run.seed)
    heldout = task.heldout_set(job.eval.size)
    if tf is not None and tf.check is not None:
        tf.check(heldout, job.eval)    # e.g. eval.max_tokens too short for a tool trace: fail before any step
    start = 0
    ckpt = run.latest_checkpoint() if resume else None
    if resume and ckpt is None:
        print(f"[rlpt] --resume: no checkpoint in {run.dir}, starting from step 0")
    if ckpt is not None:
        start = restore_training(run, ckpt, model, opt, sched, data_rng)

    meta = model.cfg.to_dict()

    def save(step: int):
        state = training_state(step, opt, sched, data_rng)
        return run.save(step, model, meta, state, keep=job.sft.keep_checkpoints)

    def step_fn(step: int) -> dict:
        model.train()
        problems = [task.sample(data_rng, "train") for _ in range(job.sft.batch_size)]
        ids, mask = sft_batch(problems, job.sft.format, tok)
        loss = sft_loss(model, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), job.sft.optim.grad_clip)
        opt.step()
        sched.step()
        if (step + 1) % job.sft.log_every and step + 1 != job.sft.steps:
            return {}
        return {"loss/sft": loss.item(), "grad/norm": gn.item(), "lr": sched.get_last_lr()[0],
                "tokens/step": int(mask.sum())}

    def eval_fn() -> dict:
        ev = evaluate_format(model, tok, heldout, job.eval, job.sft.format)
        return {"acc/heldout": ev["acc"], "response/len_mean": ev["len"], **_tool_metrics(ev)}

    train_loop(run, start, job.sft.steps, step_fn, eval_fn, save, job.eval.every, job.sft.ckpt_every,
               job.run.progress, desc="sft", show=("loss/sft", "acc/heldout"))
    ev = evaluate_format(model, tok, heldout, job.eval, job.sft.format, pass_k=job.eval.pass_k, seed=job.run.seed)
    k = job.eval.pass_k
    final = {"acc/heldout": ev["acc"], f"pass@{k}/heldout": ev[f"pass@{k}"], "response/len_mean": ev["len"],
             **_tool_metrics(ev)}
    run.log(job.sft.steps, final)
    run.close()
    return model, run, final


def _tool_metrics(ev: dict) -> dict:
    """Tool calls and tool errors per held-out response, when the evaluation ran a tool."""
    return {f"tool/{k}_heldout": ev[f"tool_{k}"] for k in ("calls", "errors") if f"tool_{k}" in ev}
