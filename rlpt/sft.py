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

import random

import torch
import torch.nn.functional as F

import rlpt.envs  # noqa: F401 - registers the envs and the trace formats they bring (sft.format=tool)
from rlpt.config import SFTJob
from rlpt.framework.environment import make_env
from rlpt.framework.evaluate import evaluate
from rlpt.gpt_mini.model import GPT, load_model, make_model
from rlpt.gpt_mini.task import ArithmeticTask, Problem, demonstration, make_task, trace_format
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.loop import train_loop
from rlpt.optim import make_optimizer
from rlpt.run import Run, restore_training, training_state


def sft_batch(problems: list[Problem], fmt: str, tok: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids (B, T) right-padded, loss_mask (B, T-1) = 1 where the target is a response token
    (and, for a trace format, one its mask keeps: a tool's reply is context, not a target)."""
    seqs = []
    for p in problems:
        text, m = demonstration(p, fmt)
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


def sft_env(fmt: str, task: ArithmeticTask, tok: CharTokenizer):
    """The env that scores a model trained on format `fmt`: arithmetic, or the trace format's own
    (the calculator for 'tool', which answers the model's calls in the agent loop)."""
    tf = trace_format(fmt)
    return make_env(tf.env if tf else "arithmetic", task=task, tokenizer=tok)


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
    env = sft_env(job.sft.format, task, tok)
    heldout = env.heldout(job.eval.size)
    if tf is not None and tf.check is not None:   # e.g. eval.max_tokens too short for a tool trace: fail now
        tf.check(task.heldout_set(job.eval.size), job.eval.max_tokens)
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
        ev = evaluate(model, env, heldout, job.eval.max_tokens)
        return {"acc/heldout": ev["acc"], "response/len_mean": ev["len"], **_tool_metrics(ev)}

    train_loop(run, start, job.sft.steps, step_fn, eval_fn, save, job.eval.every, job.sft.ckpt_every,
               job.run.progress, desc="sft", show=("loss/sft", "acc/heldout"))
    ev = evaluate(model, env, heldout, job.eval.max_tokens, k=job.eval.pass_k, seed=job.run.seed)
    k = job.eval.pass_k
    final = {"acc/heldout": ev["acc"], f"pass@{k}/heldout": ev[f"pass@{k}"], "response/len_mean": ev["len"],
             **_tool_metrics(ev)}
    run.log(job.sft.steps, final)
    run.close()
    return model, run, final


def _tool_metrics(ev: dict) -> dict:
    """Tool calls and tool errors per held-out response, when the evaluation ran a tool."""
    return {f"tool/{k}_heldout": ev[f"tool_{k}"] for k in ("calls", "errors") if f"tool_{k}" in ev}
