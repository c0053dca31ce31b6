"""Supervised fine-tuning of gpt_mini on the arithmetic task: the policy RL starts from.

    loss = − Σ_t mask_t · log π(y_t | x, y_<t) / Σ_t mask_t      (mask = 1 on response tokens only)

The prompt is context, not a target: predicting `<3+4+5>` would only teach the model the prompt
distribution. A trace format (`sft.format=tool`, registered by `rlpt.envs.calculator`) brings its
own per-character mask: the calculator's reply `=1368#` is mask 0, so the model learns to call the tool
and to read its reply, never to predict it (lesson 08); its held-out evaluation runs the tool in the
agent loop. The skeleton is `rlpt.loop.SupervisedLoop` (AdamW, linear warmup then cosine or linear
decay); held-out greedy accuracy every `eval.every` steps and pass@k at the end. Checkpoints hold
weights, optimizer, schedule, RNG and the data sampler's state, so `--resume` continues bit-identically.
`sft.data_file` trains on a JSONL file of demonstrations instead, one {"prompt", "response"} object a line
(the rejection-sampled SFT of DeepSeek-R1's third stage writes one: rlpt.recipe), drawn uniformly per step.

    rlpt sft                                  # embedded defaults
    rlpt sft recipes/sft_arith.yaml sft.steps=300 sft.format=cot run.name=sft_cot
    rlpt sft sft.data_file=demos.jsonl init_from=runs/x
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

import rlpt.envs  # noqa: F401 - registers the envs and the trace formats they bring (sft.format=tool)
from rlpt.config import ConfigError, EvalConfig, JobConfig, SFTConfig, quote, read_text
from rlpt.framework.environment import make_env
from rlpt.framework.evaluate import evaluate
from rlpt.framework.trajectory import pad_sequences
from rlpt.gpt_mini.model import GPT, load_model, make_model
from rlpt.gpt_mini.task import ArithmeticTask, Problem, demonstration, make_task, parse_prompt, trace_format
from rlpt.gpt_mini.tokenizer import EOS, PAD, CharTokenizer
from rlpt.loop import SupervisedLoop, open_run
from rlpt.run import Run


class SFTJob(JobConfig):
    """`rlpt sft`'s config: the shared sections, the SFT settings, and where to start from."""
    sft: SFTConfig = SFTConfig()
    eval: EvalConfig = EvalConfig()
    init_from: str | None = Field(None, description="checkpoint to start from (else random init)")

    @model_validator(mode="after")
    def _fits(self):
        if self.sft.data_file is None:   # a file's rows are checked one by one when it is read
            check_demonstration_fits(self.task, self.sft.format, self.model.max_seq_len)
        if self.sft.cot_frac:
            if self.sft.format not in ("direct", "cot"):
                raise ValueError(f"sft.cot_frac mixes chains of thought into plain demonstrations, not into "
                                 f"sft.format={self.sft.format}: set sft.cot_frac=0 or sft.format=direct")
            check_demonstration_fits(self.task, "cot", self.model.max_seq_len, "sft.cot_frac")
        check_operand_offset(self.sft.operand_offset, self.model.operand_index, self.task.max_operands)
        return self


def check_operand_offset(offset: int, rows: int, max_operands: int) -> None:
    """The largest index SFT trains (max_operands - 1 + offset) must have its own row of the embedding."""
    if offset and not rows:
        raise ValueError(f"sft.operand_offset={offset} shifts operand-index embeddings, but model.operand_index=0 "
                         "(none): set model.operand_index (e.g. 16) or sft.operand_offset=0")
    if offset and max_operands + offset > rows:
        raise ValueError(f"sft.operand_offset={offset} with task.max_operands={max_operands} reaches operand index "
                         f"{max_operands - 1 + offset}, past model.operand_index={rows} rows: set model.operand_index "
                         f">= {max_operands + offset} or a smaller sft.operand_offset")


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


def load_demonstrations(path: str | Path, tok: CharTokenizer, max_seq_len: int,
                        task: ArithmeticTask | None = None) -> list[tuple[list[int], list[int]]]:
    """A JSONL file of {"prompt": ..., "response": ...} -> [(prompt ids, response ids)]. A row that cannot be
    trained on is an error naming the file and line: not a JSON object with two non-empty strings, a character
    outside the alphabet, a response without the EOS `#` (the model would never learn to stop), longer than the
    context, or (with `task`) an arithmetic prompt from the held-out split, which held-out accuracy would then
    measure memorised."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sft.data_file {quote(str(p))} does not exist: write one JSON object per line, "
                          '{"prompt": "<3+4>", "response": "3+4=7#"}')
    rows = []
    for n, line in enumerate(read_text(p, "sft.data_file").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"sft.data_file {quote(str(p))} line {n}"
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise ConfigError(f"{where}: not valid JSON") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(f), str) and row[f] for f in ("prompt", "response")):
            raise ConfigError(f"{where}: expected an object with non-empty string fields 'prompt' and 'response'")
        for f in ("prompt", "response"):
            bad = next((ch for ch in row[f] if ch not in tok.stoi or ch == PAD), None)
            if bad is not None:
                raise ConfigError(f"{where}: field {f!r} holds {bad!r}, not in the alphabet {tok.alphabet[1:]!r}")
        if not row["response"].endswith(EOS):
            raise ConfigError(f"{where}: the response must end with the EOS {EOS!r} (else the model never learns to "
                              f"stop): {quote(row['response'], 40)}")
        ids = (tok.encode(row["prompt"]), tok.encode(row["response"]))
        if len(ids[0]) + len(ids[1]) > max_seq_len:
            raise ConfigError(f"{where}: prompt + response is {len(ids[0]) + len(ids[1])} tokens, more than "
                              f"model.max_seq_len={max_seq_len}")
        if task is not None and _is_heldout(task, row["prompt"]):
            raise ConfigError(f"{where}: the prompt {row['prompt']} is in the task's held-out split; training on it "
                              "would inflate acc/heldout: remove the row")
        rows.append(ids)
    if not rows:
        raise ConfigError(f"sft.data_file {quote(str(p))} holds no demonstration")
    return rows


def _is_heldout(task: ArithmeticTask, prompt: str) -> bool:
    try:
        return task.is_heldout(parse_prompt(prompt))
    except ValueError:   # not an arithmetic prompt: no split to leak from
        return False


def sft_mixed_batch(problems: list[Problem], formats: list[str],
                    tok: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """sft_batch with a format per problem (plain formats only: no trace masks)."""
    return pad_sequences([tok.encode(p.prompt) for p in problems],
                         [tok.encode(demonstration(p, f)[0]) for p, f in zip(problems, formats)], tok.pad_id)


def sft_loss(model, ids: torch.Tensor, mask: torch.Tensor, operand_offset: torch.Tensor | None = None) -> torch.Tensor:
    logits = (model(ids) if operand_offset is None else model(ids, operand_offset=operand_offset))[:, :-1]   # (B,T-1,V)
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
              allow_change: Collection[str] = (), meta: dict | None = None, env=None) -> tuple[GPT, Run, dict]:
    """Run SFT as a run folder; returns (model, run, final metrics).

    `model` replaces the gpt_mini of init_from (or of random init); `meta` is what its checkpoints record (a
    Hugging Face policy a recipe loaded passes {"hf_path": ...}: rlpt.recipe); `env` replaces the arithmetic env
    of the held-out evaluation (a prompt set's math env in the model's own tokenizer: rlpt.text_stages).

    `demonstrations(data_rng) -> (ids, mask)` draws one step's batch; the default is `sft.batch_size`
    training problems in `sft.format`. A caller with its own mix (the RLHF example's two styles) passes
    its own and keeps the run folder, evaluation and resume of the ordinary job."""
    tf = trace_format(job.sft.format)   # an unregistered format fails here, before the run folder exists
    tok, task = CharTokenizer(), make_task(job.task)
    torch.manual_seed(job.run.seed)   # the init open_run's seed gave when it came first
    if model is None:
        model = load_model(job.init_from, job.model, tok) if job.init_from else make_model(job.model, tok)
    env = env if env is not None else sft_env(job.sft.format, task, tok)
    heldout = env.heldout(job.eval.size)
    if tf is not None and tf.check is not None:   # e.g. eval.max_tokens too short for a tool trace: fail now
        tf.check(task.heldout_set(job.eval.size), job.eval.max_tokens)
    run, ckpt = open_run(job, resume, allow_change)   # the folder only once the job is known to start
    if demonstrations is None and job.sft.data_file is not None:
        rows = load_demonstrations(job.sft.data_file, tok, job.model.max_seq_len, task)

        def demonstrations(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
            drawn = [rows[rng.randrange(len(rows))] for _ in range(job.sft.batch_size)]
            return pad_sequences([p for p, _ in drawn], [r for _, r in drawn], tok.pad_id)
    if demonstrations is None:
        def demonstrations(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
            problems = [task.sample(rng, "train") for _ in range(job.sft.batch_size)]
            if not job.sft.cot_frac:
                return sft_batch(problems, job.sft.format, tok)
            cot = [rng.random() < job.sft.cot_frac for _ in problems]   # drawn only when mixing: old runs unchanged
            return sft_mixed_batch(problems, ["cot" if c else job.sft.format for c in cot], tok)

    def loss_fn(rng: random.Random) -> tuple[torch.Tensor, dict]:
        ids, mask = demonstrations(rng)
        offset = None
        if job.sft.operand_offset:   # drawn only when set: other runs keep their data stream
            offset = torch.tensor([[rng.randint(0, job.sft.operand_offset)] for _ in range(len(ids))])
        loss = sft_loss(model, ids, mask, offset)
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

    loop = SupervisedLoop(run, ckpt, model, job.sft, job.run.seed, meta=meta)
    final = loop.fit(loss_fn, eval_fn, job.eval.every, final_fn, job.run.progress, desc="sft",
                     show=("loss/sft", "acc/heldout"))
    return model, run, final


def _tool_metrics(ev: dict) -> dict:
    """Tool calls and tool errors per held-out response, when the evaluation ran a tool."""
    return {f"tool/{k}_heldout": ev[f"tool_{k}"] for k in ("calls", "errors") if f"tool_{k}" in ev}
