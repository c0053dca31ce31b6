"""Preference pairs: where (x, y_w ≻ y_l) come from, and how they become tensors.

    file     one JSON object a line: {"prompt": "<3+4>", "chosen": "3+4=7#", "rejected": "3+4=8#"}
    sampled  k responses per training prompt from the policy itself, scored by the task's verifier:
             every prompt with at least one correct and one wrong sample gives pairs (correct ≻ wrong)

Sampled pairs are on-policy for the SFT model, the data DPO's derivation assumes (π_ref = the
policy that produced the data; lesson 16): a pair the policy would never produce teaches
it little and moves it off its own distribution. Prompts whose k samples are all right or all
wrong carry no preference and give no pair; `stats` counts them (the same degenerate groups GRPO
skips, lesson 13). Among the correct samples of a prompt, the *cleanest* is chosen first: the
canonical response in the policy's format (`fmt`), then one whose every `a+b=c` step is true (a
right total reached through a wrong step is luck, not arithmetic), then the shortest. Each
distinct wrong sample is paired with the next-best correct one, up to `max_pairs_per_prompt`, and
(by default, `rejected="first_error"`) cut after its first wrong step: see `cut_at_first_error`.

`collate_pairs` stacks the chosen rows over the rejected rows (one forward for both, TRL's
"concatenated forward") with a response mask aligned to `per_token_logp`'s (B, T-1) columns.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rlpt.config import QUOTE_CHARS, ConfigError, quote, read_text
from rlpt.framework.trajectory import pad_sequences
from rlpt.gpt_mini.generate import SamplingParams, encode_prompt, sample_texts
from rlpt.gpt_mini.task import ArithmeticTask, Problem, verify
from rlpt.gpt_mini.tokenizer import PAD, CharTokenizer

FIELDS = ("prompt", "chosen", "rejected")
_STEP = re.compile(r"(\d+)\+(\d+)=(\d+)")


class PreferenceDataError(ConfigError):
    """A preference file that cannot be used, phrased with its file, line and field."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str        # y_w, the preferred response
    rejected: str      # y_l


def load_pairs(path: str | Path, tok: CharTokenizer, max_seq_len: int) -> tuple[list[PreferencePair], dict]:
    """Read a JSONL preference file -> (pairs, skips).

    A malformed row (not JSON, a missing field, a non-string field, a character outside the
    tokenizer, the padding character) is an error naming the file, line and field: silently dropping
    it would change the data without saying so. Two kinds of row are skipped and counted instead,
    because they are legal but useless: `identical` (chosen == rejected: Δ ≡ 0, a constant loss with
    zero gradient) and `too_long` (prompt + response longer than the model's context: it cannot be
    scored whole). The file must be UTF-8; an error quotes at most `QUOTE_CHARS` of any value.
    """
    p = Path(path)
    if not p.is_file():
        raise PreferenceDataError(f"preference file {quote(str(p))} does not exist; write one JSON object per line "
                                  '({"prompt": ..., "chosen": ..., "rejected": ...}) or leave the file key unset '
                                  "to sample pairs from the policy")
    try:
        text = read_text(p, "preference file")
    except ConfigError as e:
        raise PreferenceDataError(str(e)) from None
    where = str(p) if len(str(p)) <= QUOTE_CHARS else quote(str(p))
    pairs, skips = [], {"identical": 0, "too_long": 0}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:   # RecursionError: [[[[... nested past Python's stack
            why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise PreferenceDataError(f"{where}:{n}: not valid JSON ({why})") from None
        if not isinstance(row, dict):
            raise PreferenceDataError(f"{where}:{n}: expected a JSON object with {', '.join(FIELDS)}, "
                                      f"got {type(row).__name__}")
        for f in FIELDS:
            if f not in row:
                raise PreferenceDataError(f"{where}:{n}: missing field {f!r} (each row needs "
                                          f"{', '.join(FIELDS)})")
            if not isinstance(row[f], str):
                raise PreferenceDataError(f"{where}:{n}: field {f!r} must be a string, got "
                                          f"{type(row[f]).__name__} {quote(row[f])}")
            if not hasattr(tok, "stoi"):    # a model's own tokenizer takes any text (rlpt.text_stages)
                continue
            bad = next((i for i, ch in enumerate(row[f]) if ch not in tok.stoi or ch == PAD), None)
            if bad is not None:
                ch = row[f][bad]
                what = "the padding character (the model would read it as padding, not text)" if ch == PAD else \
                    f"not in the arithmetic alphabet {tok.alphabet[1:]!r}"
                raise PreferenceDataError(f"{where}:{n}: character {ch!r} (position {bad} of field {f!r}) is "
                                          f"{what}; remove it")
        pair = PreferencePair(row["prompt"], row["chosen"], row["rejected"])
        lens = [len(encode_prompt(tok, pair.prompt))] + [len(tok.encode(getattr(pair, f))) for f in FIELDS[1:]]
        if lens[0] == 0 or lens[1] == 0 or lens[2] == 0:
            raise PreferenceDataError(f"{where}:{n}: prompt, chosen and rejected must be non-empty strings")
        if pair.chosen == pair.rejected:
            skips["identical"] += 1
        elif lens[0] + max(lens[1], lens[2]) > max_seq_len:
            skips["too_long"] += 1
        else:
            pairs.append(pair)
    if not pairs:
        raise PreferenceDataError(f"preference file {quote(str(p))} holds no usable pair (skipped: {skips}; "
                                  f"the model's context is {max_seq_len} tokens)")
    return pairs, skips


def save_pairs(path: str | Path, pairs: list[PreferencePair]) -> Path:
    p = Path(path)
    tmp = p.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(x)) + "\n" for x in pairs))
    tmp.replace(p)
    return p


def steps_valid(response: str) -> bool:
    """Every `a+b=c` step in the response is true arithmetic (vacuously true for a direct answer)."""
    return all(int(a) + int(b) == int(c) for a, b, c in _STEP.findall(response))


def cleanliness(response: str, canonical: str | None) -> tuple:
    """Sort key among correct responses, best first: canonical, all steps true, shortest, then text."""
    return (response != canonical, not steps_valid(response), len(response), response)


def distinct_problems(task: ArithmeticTask, rng: random.Random, n: int, split: str) -> list[Problem]:
    """Up to n distinct problems of `split`, in the order `rng` draws them (a small task may hold fewer)."""
    problems, seen = [], set()
    for _ in range(50 * n + 1000):
        if len(problems) == n:
            break
        p = task.sample(rng, split)
        if p not in seen:
            seen.add(p)
            problems.append(p)
    return problems


@torch.no_grad()
def sample_groups(model, tok: CharTokenizer, prompts: list[str], k: int, sp: SamplingParams,
                  generator: torch.Generator, batch: int = 512, progress: bool = False) -> list[str]:
    """`sample_texts` (k samples per prompt, prompt i's at [i*k:(i+1)*k]) with a progress bar: the same
    batches drawn from the same generator in the same order, so the same samples. Sampling a thousand
    prompts × 8 is the long silent part of `rlpt dpo` and `rlpt rm` (~15 s on a laptop CPU)."""
    flat = [p for p in prompts for _ in range(k)]
    texts = []
    with tqdm(total=len(flat), desc="sampling pairs", unit="sample", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(flat), batch):
            texts += sample_texts(model, tok, flat[i:i + batch], 1, sp, generator, batch)
            bar.update(len(flat[i:i + batch]))
    return texts


@torch.no_grad()
def sample_pairs(model, tok: CharTokenizer, task: ArithmeticTask, n_prompts: int, k: int, temperature: float,
                 max_tokens: int, seed: int, fmt: str | None = None, max_pairs_per_prompt: int = 2,
                 rejected: str = "first_error", batch: int = 512,
                 progress: bool = False) -> tuple[list[PreferencePair], dict]:
    """Pairs from the policy's own samples on `n_prompts` distinct training prompts (see module doc).

    -> (pairs, stats) with stats: prompts, samples, sample_acc (the policy's accuracy at this
    temperature), prompts_all_correct, prompts_all_wrong (both give no pair), prompts_with_pairs, pairs.
    """
    if rejected not in ("full", "first_error"):
        raise ValueError(f"rejected must be 'full' or 'first_error', got {rejected!r}")
    if k < 2:
        raise ValueError(f"sample_pairs needs k >= 2 samples per prompt to compare (got k={k}): set dpo.pairs.k")
    rng = random.Random(seed)
    problems = distinct_problems(task, rng, n_prompts, "train")
    gen = torch.Generator().manual_seed(seed)
    sp = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    texts = sample_groups(model, tok, [p.prompt for p in problems], k, sp, gen, batch, progress)
    pairs, stats = [], {"prompts": len(problems), "samples": len(texts), "prompts_all_correct": 0,
                        "prompts_all_wrong": 0, "prompts_with_pairs": 0}
    n_correct = 0
    for j, p in enumerate(problems):
        group = texts[j * k:(j + 1) * k]
        right = sorted({t for t in group if verify(t, p.gold)}, key=lambda t: cleanliness(t, _canonical(p, fmt)))
        wrong = sorted({t for t in group if not verify(t, p.gold)})
        n_correct += sum(verify(t, p.gold) for t in group)
        pairs += pair_group(p.prompt, right, wrong, rng, max_pairs_per_prompt, stats,
                            cut_at_first_error if rejected == "first_error" else None)
    stats["sample_acc"] = n_correct / max(1, len(texts))
    stats["pairs"] = len(pairs)
    return pairs, stats


def pair_group(prompt: str, right: list[str], wrong: list[str], rng: random.Random, max_pairs: int, stats: dict,
               cut: Callable[[str, str], str] | None = None) -> list[PreferencePair]:
    """One prompt's pairs: each distinct wrong sample (shuffled by `rng`, at most `max_pairs`) against the next right
    one in `right`'s order (best first), the rejected one `cut(chosen, rejected)` when given. A group with no wrong
    or no right sample gives none and is counted in `stats` (prompts_all_correct / _wrong, else _with_pairs)."""
    if not wrong or not right:
        stats["prompts_all_correct" if not wrong else "prompts_all_wrong"] += 1
        return []
    rng.shuffle(wrong)
    stats["prompts_with_pairs"] += 1
    chosen = [right[i % len(right)] for i in range(min(max_pairs, len(wrong)))]
    return [PreferencePair(prompt, c, cut(c, w) if cut else w) for c, w in zip(chosen, wrong)]


def cut_at_first_error(chosen: str, rejected: str) -> str:
    """The rejected response up to the end of the step where it first leaves the chosen one.

    `7+6=13,13+4=18,18+7=25#` against `7+6=13,13+4=17,17+7=24#` -> `7+6=13,13+4=18,`. The common
    prefix cancels in Δ anyway (same tokens, same context, under π_θ and π_ref); what the cut removes
    is the blame a sequence-level loss puts on every token *after* the mistake, e.g. the correct
    `18+7=25` given the wrong 18 (Step-DPO, Lai et al. 2024). log π of the cut is the probability of
    every response that starts with it, so the pair is still a pair of events under the policy.
    """
    d = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    ends = [i for i in range(d, len(rejected)) if rejected[i] in ",#"]
    return rejected[:ends[0] + 1] if ends else rejected


def _canonical(problem, fmt: str | None) -> str | None:
    return problem.response(fmt) if fmt else None


@dataclass
class PairBatch:
    """Chosen rows 0..B-1 over rejected rows B..2B-1 of one padded tensor."""
    ids: torch.Tensor          # (2B, T) prompt + response, right-padded
    mask: torch.Tensor         # (2B, T-1) 1 where column j's target (token j+1) is a response token
    n: int                     # B pairs

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)   # (2B,) |y| in tokens


def collate_pairs(pairs: list[PreferencePair], tok: CharTokenizer) -> PairBatch:
    """Tokenise and pad [chosen_1..chosen_B, rejected_1..rejected_B] -> PairBatch."""
    if not pairs:
        raise ValueError("collate_pairs() got no pairs")
    seqs = [(encode_prompt(tok, x.prompt), tok.encode(x.chosen)) for x in pairs] + \
           [(encode_prompt(tok, x.prompt), tok.encode(x.rejected)) for x in pairs]
    return collate_responses(seqs, tok.pad_id, n=len(pairs))


def collate_responses(seqs: list[tuple[list[int], list[int]]], pad_id: int, n: int = 0) -> PairBatch:
    """(prompt ids, response ids) rows -> right-padded ids (N, T) and response mask (N, T-1)."""
    ids, mask = pad_sequences([a for a, _ in seqs], [b for _, b in seqs], pad_id)   # (N, T), (N, T-1)
    return PairBatch(ids, mask, n or len(seqs) // 2)

