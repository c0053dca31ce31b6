"""Monte-Carlo process labels (Math-Shepherd, Wang et al. 2023), written in TRL's stepwise PRM format.

    for each prefix x ⧺ s_1..s_k of a sampled response:  N continuations y_j ~ π(· | x, s_≤k)
    soft label  p̂_k = (1/N) Σ_j verify(s_≤k ⧺ y_j)        hard label  1[any j correct]

The label estimates the PRM contract of lesson 17, P(verifier = 1 | prefix up to step k), under the
completer π: it is policy-dependent (a completer that errs everywhere labels good prefixes 0) and, for
HE, optimistic where a wrong step is later repaired. The last step needs no continuation: its label is
the verifier's verdict on the response itself.

Each prefix is one engine request with `SamplingParams(n=N)`: the prefix is prefilled once and the N
samples fork its KV blocks (the engine's `tokens/shared_by_fork` counts what was not recomputed), and
the radix cache shares each response's shorter prefixes with the longer ones.

JSONL rows (TRL `PRMTrainer` stepwise format plus our extra keys):

    {"prompt": "<3+4+5>", "completions": ["3+4=7,", "7+5=12#"], "labels": [true, true],
     "soft_labels": [1.0, 1.0], "truth": [true, true]}

Steps keep their delimiter, so TRL takes them with `step_separator=""` and puts each label on the
delimiter token, exactly where `rlpt.search.scorer` reads its score. `truth` (exact step truth) is for
evaluation only.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rlpt.engine.sampling import SamplingParams
from rlpt.gpt_mini.task import Problem, parse_prompt
from rlpt.search.steps import outcome, split_steps, true_step_labels


@dataclass
class StepRow:
    prompt: str
    completions: list[str]           # the steps, each with its delimiter; "".join() is the response
    labels: list[bool]               # hard: any continuation correct (TRL's boolean labels)
    soft_labels: list[float]         # fraction of the N continuations that were correct
    truth: list[bool]                # exact prefix truth (evaluation only)

    @property
    def response(self) -> str:
        return "".join(self.completions)


def sample_responses(llm, problems: list[Problem], temperature: float, max_tokens: int, seed: int) -> list[str]:
    """One response per problem from the policy behind `llm` (an `rlpt.engine.LLM` or anything with its
    `generate`), decoded from its tokens so the EOS stays in the text."""
    sp = SamplingParams(n=1, temperature=temperature, max_tokens=max_tokens, seed=seed)
    outs = llm.generate([p.prompt for p in problems], [_seeded(sp, seed, i) for i in range(len(problems))])
    return [llm.tokenizer.decode(o.outputs[0].token_ids) for o in outs]


def _seeded(sp: SamplingParams, seed: int, i: int) -> SamplingParams:
    """Request i's own seed: the same draws whatever else is in the batch (the engine's counter RNG)."""
    return SamplingParams(n=sp.n, temperature=sp.temperature, max_tokens=sp.max_tokens,
                          seed=(seed * 1_000_003 + i) % (2 ** 62), stop_token_ids=sp.stop_token_ids)


def mc_labels(llm, problems: list[Problem], responses: list[str], n: int = 8, temperature: float = 1.0,
              max_tokens: int = 40, seed: int = 0) -> list[StepRow]:
    """Math-Shepherd labels for each (problem, response): one request per intermediate prefix with n = N."""
    prompts, where = [], []
    for i, (p, r) in enumerate(zip(problems, responses)):
        steps = split_steps(r)
        for k in range(len(steps) - 1):                 # the last step is labelled by the verifier itself
            prompts.append(p.prompt + "".join(steps[:k + 1]))
            where.append((i, k))
    soft: dict[tuple[int, int], float] = {}
    if prompts:
        sp = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens)
        outs = llm.generate(prompts, [_seeded(sp, seed, j) for j in range(len(prompts))])
        for (i, k), prefix, out in zip(where, prompts, outs):
            head = prefix[len(problems[i].prompt):]
            wins = [outcome(problems[i], head + llm.tokenizer.decode(c.token_ids)) for c in out.outputs]
            soft[(i, k)] = sum(wins) / len(wins)
    rows = []
    for i, (p, r) in enumerate(zip(problems, responses)):
        steps = split_steps(r)
        s = [soft[(i, k)] for k in range(len(steps) - 1)] + ([float(outcome(p, r))] if steps else [])
        rows.append(StepRow(p.prompt, steps, [x > 0 for x in s], s, true_step_labels(p, r)))
    return rows


def save_rows(path: str | Path, rows: list[StepRow]) -> None:
    Path(path).write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows))


def load_rows(path: str | Path) -> list[StepRow]:
    """Stepwise JSONL -> rows. `soft_labels` defaults to the boolean `labels` (a plain TRL file), `truth`
    is recomputed from the prompt (an arithmetic prompt is its own answer key)."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        if not {"prompt", "completions", "labels"} <= set(d) or len(d["completions"]) != len(d["labels"]):
            raise ValueError(f"{path}:{n}: a stepwise row needs prompt, completions and labels of equal length")
        soft = [float(x) for x in d.get("soft_labels", d["labels"])]
        p = parse_prompt(d["prompt"])
        rows.append(StepRow(d["prompt"], list(d["completions"]), [bool(x) for x in d["labels"]], soft,
                            true_step_labels(p, "".join(d["completions"]))))
    return rows


def auroc(scores: list[float], truth: list[bool]) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties counted half
    (the Mann-Whitney U). NaN when one class is missing."""
    pos = sorted(s for s, t in zip(scores, truth) if t)
    neg = sorted(s for s, t in zip(scores, truth) if not t)
    if not pos or not neg:
        return float("nan")
    wins = sum(bisect.bisect_left(neg, s) + 0.5 * (bisect.bisect_right(neg, s) - bisect.bisect_left(neg, s))
               for s in pos)
    return wins / (len(pos) * len(neg))


def within_auroc(scores: list[list[float]], truth: list[list[bool]]) -> float:
    """The ranking best-of-N does: per prompt, the AUROC of its own candidates' scores against their
    verdicts; the mean over prompts that have both a right and a wrong candidate (NaN if none has)."""
    per = [a for a in (auroc(s, t) for s, t in zip(scores, truth)) if a == a]      # a != a: NaN, one class
    return sum(per) / len(per) if per else float("nan")


def label_auroc(rows: list[StepRow], intermediate_only: bool = True) -> float:
    """AUROC of the soft labels against exact prefix truth (by default over the steps MC estimated, the
    last step's label being the verifier's verdict)."""
    s, t = [], []
    for r in rows:
        m = len(r.completions) - 1 if intermediate_only else len(r.completions)
        s += r.soft_labels[:m]
        t += r.truth[:m]
    return auroc(s, t)
