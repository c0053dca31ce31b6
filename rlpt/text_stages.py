"""A recipe's sft, rm, dpo and rs_sft stages on a prompt set in the model's own tokenizer (`data.prompts` with
`model.hf_path`): what a real Llama / Qwen needs to run tulu3 or r1 (docs/real_models.md "Recipes on a Hugging
Face policy"). The arithmetic stages (rlpt.sft, rlpt.preference.dpo, rlpt.stages' rejection sampling) do the
training; this module gives them the prompt set's data instead of the arithmetic task's.

    TextTask              data.prompts' training and held-out rows (the split every train stage uses), the math env
                          over them, and the tokenizer prompts go through (chat template or plain)
    demonstration         the response SFT imitates: a GSM8K row's reasoning + "#### <answer>" (the dataset's own
                          layout), a MATH row's solution, a rows row's metadata.solution
    text_demonstrations   an SFT stage's batches: the rows' demonstrations, or sft.data_file's {prompt, response}
                          rows (rs_sft's kept samples); prompt ids through the template, response + EOS, loss on
                          the response only
    sample_text_pairs     DPO and RM pairs from the policy's own k samples per prompt, ranked by the math verifier
                          (a right answer that ended with EOS ≻ a wrong one)
    rejection_sample_text rs_sft: the policy's verified samples as {prompt, response} rows
    text_stage_kwargs     what rlpt.recipe hands an sft / rs_sft / dpo / rm stage's runner on a prompt set

Text pairs hold the prompt as the row's text and the responses as decoded text (EOS included), re-encoded when
trained on (TRL does the same); a row with its own system message is refused here (a pair has no field for it).
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

from rlpt.config import ConfigError, quote, read_text
from rlpt.framework.environment import Prompt, make_env
from rlpt.framework.trajectory import pad_sequences
from rlpt.gpt_mini.generate import SamplingParams, stop_ids
from rlpt.hf_policy import DataSection, prompt_set_rows
from rlpt.preference.data import PreferencePair, pair_group, sample_groups


class TextTask:
    """data.prompts in `policy`'s own tokenizer: its rows, the math env over them, the prompt tokenizer."""

    def __init__(self, data: DataSection, policy, max_tokens: int, seed: int, what: str):
        from rlpt.models.chat import PromptTokenizer
        self.data = data
        self.tok = PromptTokenizer(policy.tokenizer, chat_template=data.chat_template, system=data.system)
        self.max_len = policy.cfg.max_seq_len
        kw = prompt_set_rows(data, max_tokens, self.tok, self.max_len)
        self.rows, self.heldout_rows = kw["rows"], kw["heldout_rows"]
        own = next((r for r in self.rows if r.system is not None), None)
        if own is not None:
            raise ConfigError(f"data.prompts: row {own.id!r} has its own system message, which a {what} stage's "
                              "demonstrations and pairs do not carry; give it to every row with data.system instead")
        self.env = make_env("math", tokenizer=self.tok, seed=seed, **kw)
        self.stop_texts = [self.tok.decode([i]) for i in stop_ids(self.tok)]   # EOS, and a chat model's end of turn

    def prompt(self, row) -> Prompt:
        return Prompt(row.prompt, self.tok.encode_prompt(row.prompt), row.answer)

    def strip_eos(self, text: str) -> str | None:
        """`text` without its final stop token, or None when it did not end with one (cut at max_tokens)."""
        return next((text[:-len(s)] for s in self.stop_texts if s and text.endswith(s)), None)


def demonstration(row, fmt: str) -> str:
    """The response SFT imitates for a prompt-set row (no EOS: the tokenizer's own is appended as an id)."""
    sol = (row.metadata or {}).get("solution")
    if not isinstance(sol, str) or not sol.strip():
        raise ConfigError(f"data.prompts: row {row.id!r} has no solution to imitate (an sft stage on a prompt set "
                          "trains on data.format=gsm8k's reasoning or math's solution, or a rows row's "
                          "metadata.solution); add one, or train this stage on sft.data_file={prompt, response} rows")
    return f"{sol.strip()}\n#### {row.answer}" if fmt == "gsm8k" else sol.strip()


def read_text_demonstrations(path: str | Path) -> list[tuple[str, str]]:
    """sft.data_file's {"prompt", "response"} rows as text (any characters: the model's tokenizer reads them)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sft.data_file {quote(str(p))} does not exist: one JSON object a line, "
                          '{"prompt": "...", "response": "..."}')
    rows = []
    for n, line in enumerate(read_text(p, "sft.data_file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise ConfigError(f"sft.data_file {quote(str(p))} line {n}: not valid JSON") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(f), str) and row[f] for f in ("prompt", "response")):
            raise ConfigError(f"sft.data_file {quote(str(p))} line {n}: expected an object with non-empty string "
                              "fields 'prompt' and 'response'")
        rows.append((row["prompt"], row["response"]))
    if not rows:
        raise ConfigError(f"sft.data_file {quote(str(p))} holds no demonstration")
    return rows


def text_demonstrations(task: TextTask, batch_size: int, data_file: str | None = None
                        ) -> Callable[[random.Random], tuple[torch.Tensor, torch.Tensor]]:
    """An SFT stage's batch sampler (rlpt.sft.train_sft's `demonstrations`): `batch_size` rows drawn uniformly."""
    tok = task.tok
    texts = read_text_demonstrations(data_file) if data_file else \
        [(r.prompt, demonstration(r, task.data.format)) for r in task.rows]
    rows = []
    for prompt, response in texts:
        ids = (tok.encode_prompt(prompt), tok.encode(response) + [tok.eos_id])
        if len(ids[0]) + len(ids[1]) > task.max_len:
            raise ConfigError(f"an SFT demonstration is {len(ids[0]) + len(ids[1])} tokens, more than the model's "
                              f"context of {task.max_len}: {quote(prompt, 60)}; drop the longer rows")
        rows.append(ids)

    def draw(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        drawn = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
        return pad_sequences([p for p, _ in drawn], [r for _, r in drawn], tok.pad_id)
    return draw


def _groups(policy, task: TextTask, n_prompts: int, k: int, temperature: float, max_tokens: int, seed: int,
            progress: bool, rows: list | None = None) -> tuple[list, list[list[tuple[str, float]]]]:
    """n distinct rows (training rows unless `rows`) and, for each, its k samples as (text, reward)."""
    rng = random.Random(seed)
    pool = task.rows if rows is None else rows
    rows = rng.sample(pool, min(n_prompts, len(pool)))
    gen = torch.Generator().manual_seed(seed)
    texts = sample_groups(policy, task.tok, [r.prompt for r in rows], k,
                          SamplingParams(max_tokens=max_tokens, temperature=temperature), gen, progress=progress)
    return rows, [[(t, task.env.verify(task.prompt(r), t).reward) for t in texts[j * k:(j + 1) * k]]
                  for j, r in enumerate(rows)]


@torch.no_grad()
def sample_text_pairs(policy, task: TextTask, n_prompts: int, k: int, temperature: float, max_tokens: int,
                      seed: int, max_pairs_per_prompt: int = 2, progress: bool = False, heldout: bool = False
                      ) -> tuple[list[PreferencePair], dict]:
    """DPO / RM pairs from the policy's own samples: per prompt, each distinct wrong sample (up to
    max_pairs_per_prompt) against a distinct right one that ended with EOS, in the order sampled; on the training
    rows, or the held-out ones (`heldout`: an RM's held-out pairs). -> (pairs, stats) as rlpt.preference.data's.
    No ranking among the right ones: the math verifier reads only the final answer, so it cannot tell a clean
    derivation from a lucky one (the arithmetic sampler can, and prefers the clean ones), and "shortest first"
    chose chains that skip steps."""
    if k < 2:
        raise ConfigError(f"pairs.k={k}: a pair needs k >= 2 samples per prompt")
    rows, groups = _groups(policy, task, n_prompts, k, temperature, max_tokens, seed, progress,
                           task.heldout_rows if heldout else None)
    rng = random.Random(seed)
    pairs, stats = [], {"prompts": len(rows), "samples": len(rows) * k, "prompts_all_correct": 0,
                        "prompts_all_wrong": 0, "prompts_with_pairs": 0}
    n_right = 0
    for row, group in zip(rows, groups):
        n_right += sum(r > 0 for _, r in group)
        right = list(dict.fromkeys(t for t, r in group if r > 0 and task.strip_eos(t) is not None))   # as sampled
        wrong = sorted({t for t, r in group if r <= 0})
        pairs += pair_group(row.prompt, right, wrong, rng, max_pairs_per_prompt, stats)
    stats["sample_acc"] = n_right / max(1, stats["samples"])
    stats["pairs"] = len(pairs)
    return pairs, stats


@torch.no_grad()
def rejection_sample_text(policy, task: TextTask, rs, seed: int, out: Path, progress: bool = False) -> dict:
    """rs_sft on a prompt set: keep the samples the math verifier rewards ≥ rs.min_reward that ended with EOS, at
    most rs.max_per_prompt distinct ones per prompt, as {prompt, response} rows (EOS dropped) in `out`."""
    rows, groups = _groups(policy, task, rs.prompts, rs.k, rs.temperature, rs.max_tokens, seed, progress)
    kept_rows, kept_prompts = [], 0
    for row, group in zip(rows, groups):
        kept = []
        for t, r in group:
            body = task.strip_eos(t)
            if body and r >= rs.min_reward and body not in kept:
                kept.append(body)
            if len(kept) == rs.max_per_prompt:
                break
        kept_prompts += bool(kept)
        kept_rows += [{"prompt": row.prompt, "response": b} for b in kept]
    if not kept_rows:
        raise ConfigError(f"rejection sampling kept no sample of {len(rows)} prompts × {rs.k} (reward ≥ "
                          f"rs.min_reward={rs.min_reward:g}, ended with EOS): raise rs.k or rs.max_tokens, or start "
                          "from a stronger policy")
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept_rows))
    tmp.replace(out)
    return {"prompts": len(rows), "samples": len(rows) * rs.k, "kept": len(kept_rows), "prompts_kept": kept_prompts}


# -- what a recipe's stage runs with on a prompt set (rlpt.recipe) ------------------------------------------------
def text_stage_kwargs(data: DataSection, seed: int, progress: bool, kind: str, stage, policy) -> dict:
    """What an sft / rs_sft / dpo / rm stage on data.prompts runs with (rlpt.text_stages): the math env over the prompt
    set (its held-out evaluation), and the SFT batches or the DPO pairs and tokenizer. sft.format, sft.cot_frac,
    dpo.pairs.format, dpo.pairs.rejected and rm.pairs.preference name arithmetic data and are not read here."""
    if kind in ("sft", "rs_sft"):
        task = TextTask(data, policy, stage.eval.max_tokens, seed, kind)
        return {"env": task.env, "demonstrations": text_demonstrations(task, stage.sft.batch_size,
                                                                       stage.sft.data_file)}
    pc = stage.dpo.pairs if kind == "dpo" else stage.rm.pairs
    task = TextTask(data, policy, pc.max_tokens if kind == "rm" else max(pc.max_tokens, stage.eval.max_tokens),
                    seed, kind)

    def pairs(heldout: bool = False, n: int = pc.prompts, seed: int = seed):
        return sample_text_pairs(policy, task, n, pc.k, pc.temperature, pc.max_tokens, seed, pc.max_pairs_per_prompt,
                                 progress, heldout)
    if kind == "dpo":
        return {"tok": task.tok, "env": task.env, "sample": pairs}

    def rm_sample():   # the RM's held-out pairs from the held-out rows, as rm_pairs draws them from held-out prompts
        (train, stats), (held, _) = pairs(), pairs(True, pc.heldout_prompts, seed + 1)
        return train, held, {**stats, "source": "sampled (the math verifier)"}
    return {"tok": task.tok, "sample": rm_sample}
