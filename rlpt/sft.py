"""Supervised fine-tuning of gpt_mini on the arithmetic task: the policy RL starts from.

    loss = − Σ_t mask_t · log π(y_t | x, y_<t) / Σ_t mask_t      (mask = 1 on response tokens only)

The prompt is context, not a target: predicting `<3+4+5>` would only teach the model the prompt
distribution. A trace format (`sft.format=tool`, registered by `rlpt.envs.calculator`) brings its
own per-character mask: the calculator's reply `=1368#` is mask 0, so the model learns to call the tool
and to read its reply, never to predict it (lesson 08); its held-out evaluation runs the tool in the
agent loop. The skeleton is `rlpt.loop.SupervisedLoop` (AdamW, linear warmup then cosine or linear
decay); held-out greedy accuracy every `eval.every` steps and pass@k at the end. Checkpoints hold
weights, optimizer, schedule, RNG and the data sampler's state, so `--resume` continues bit-identically.

    rlpt sft                                  # embedded defaults
    rlpt sft recipes/sft_arith.yaml sft.steps=300 sft.format=cot run.name=sft_cot
"""
from __future__ import annotations

import random
from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

import rlpt.envs  # noqa: F401 - registers the envs and the trace formats they bring (sft.format=tool)
from rlpt.config import EvalConfig, JobConfig, SFTConfig
from rlpt.framework.environment import make_env
from rlpt.framework.evaluate import evaluate
from rlpt.framework.trajectory import pad_sequences
from rlpt.gpt_mini.model import GPT, load_model, make_model
from rlpt.gpt_mini.task import ArithmeticTask, Problem, demonstration, make_task, trace_format
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.loop import SupervisedLoop, open_run
from rlpt.run import Run


class SFTJob(JobConfig):
    """`rlpt sft`'s config: the shared sections, the SFT settings, and where to start from."""
    sft: SFTConfig = SFTConfig()
    eval: EvalConfig = EvalConfig()
    init_from: str | None = Field(None, description="checkpoint to start from (else random init)")

    @model_validator(mode="after")
    def _fits(self):
        check_demonstration_fits(self.task, self.sft.format, self.model.max_seq_len)
        return self


def check_demonstration_fits(task, fmt: str, max_seq_len: int, key: str = "sft.format") -> None:
    """SFT trains on prompt + response as one sequence, so the longest demonstration (every operand the
    largest value) must fit the model's context whole; else the first batch fails mid-run."""
    worst = Problem((task.max_value,) * task.max_operands)
    tok = CharTokenizer()
    n = len(tok.encode(worst.prompt)) + len(tok.encode(demonstration(worst, fmt)[0]))
    if n > max_seq_len:
        raise ValueError(f"{key}={fmt}: the longest demonstration ({worst.prompt} and its answer) has {n} tokens but "
                         f"model.max_seq_len={max_seq_len}: raise model.max_seq_len or lower task.max_operands / "
                         "task.max_value")


def sft_batch(problems: list[Problem], fmt: str, tok: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids (B, T) right-padded, loss_mask (B, T-1) = 1 where the target is a response token
    (and, for a trace format, one its mask keeps: a tool's reply is context, not a target)."""
    responses, masks = [], []
    for p in problems:
        text, m = demonstration(p, fmt)
        b = tok.encode(text)
        if m is not None and len(m) != len(b):
            raise ValueError(f"sft.format={fmt!r}: the trace's mask has {len(m)} entries for {len(b)} tokens "
                             "(a per-character mask needs the character tokenizer)")
        responses.append(b)
        masks.append(m)
    return pad_sequences([tok.encode(p.prompt) for p in problems], responses, tok.pad_id, masks)


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
Demonstrations = Callable[[random.Random], tuple[torch.Tensor, torch.Tensor]]


def train_sft(job: SFTJob, resume: bool = False, model: GPT | None = None,
              demonstrations: Demonstrations | None = None,
              allow_change: Collection[str] = ()) -> tuple[GPT, Run, dict]:
    """Run SFT as a run folder; returns (model, run, final metrics).

    `demonstrations(data_rng) -> (ids, mask)` draws one step's batch; the default is `sft.batch_size`
    training problems in `sft.format`. A caller with its own mix (the RLHF example's two styles) passes
    its own and keeps the run folder, evaluation and resume of the ordinary job."""
    tf = trace_format(job.sft.format)   # an unregistered format fails here, before the run folder exists
    tok, task = CharTokenizer(), make_task(job.task)
    torch.manual_seed(job.run.seed)   # the init open_run's seed gave when it came first
    if model is None:
        model = load_model(job.init_from, job.model, tok) if job.init_from else make_model(job.model, tok)
    env = sft_env(job.sft.format, task, tok)
    heldout = env.heldout(job.eval.size)
    if tf is not None and tf.check is not None:   # e.g. eval.max_tokens too short for a tool trace: fail now
        tf.check(task.heldout_set(job.eval.size), job.eval.max_tokens)
    run, ckpt = open_run(job, resume, allow_change)   # the folder only once the job is known to start
    if demonstrations is None:
        def demonstrations(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
            return sft_batch([task.sample(rng, "train") for _ in range(job.sft.batch_size)], job.sft.format, tok)

    def loss_fn(rng: random.Random) -> tuple[torch.Tensor, dict]:
        ids, mask = demonstrations(rng)
        loss = sft_loss(model, ids, mask)
        return loss, {"loss/sft": loss.detach(), "tokens/step": int((mask > 0).sum())}

    def eval_fn() -> dict:
        ev = evaluate(model, env, heldout, job.eval.max_tokens)
        return {"acc/heldout": ev["acc"], "response/len_mean": ev["len"], **_tool_metrics(ev)}

    def final_fn() -> dict:
        k = job.eval.pass_k
        ev = evaluate(model, env, heldout, job.eval.max_tokens, k=k, seed=job.run.seed)
        final = {"acc/heldout": ev["acc"], f"pass@{k}/heldout": ev[f"pass@{k}"], "response/len_mean": ev["len"],
                 **_tool_metrics(ev)}
        run.log(job.sft.steps, final)
        return final

    loop = SupervisedLoop(run, ckpt, model, job.sft, job.run.seed)
    final = loop.fit(loss_fn, eval_fn, job.eval.every, final_fn, job.run.progress, desc="sft",
                     show=("loss/sft", "acc/heldout"))
    return model, run, final


def _tool_metrics(ev: dict) -> dict:
    """Tool calls and tool errors per held-out response, when the evaluation ran a tool."""
    return {f"tool/{k}_heldout": ev[f"tool_{k}"] for k in ("calls", "errors") if f"tool_{k}" in ev}
