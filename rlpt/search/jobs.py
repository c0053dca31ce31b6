"""The jobs of lesson 17: `rlpt prm` / `rlpt orm` train a step scorer, `rlpt search` spends test-time compute.

    rlpt prm init_from=runs/sft_cot [scorer.data.n=8] [key=value ...] [--resume]     -> runs/prm
    rlpt orm init_from=runs/sft_cot [key=value ...] [--resume]                        -> runs/orm
    rlpt search policy=runs/sft_cot scorer=runs/prm [search.strategies=[greedy,beam]] [search.n=[4,16]]

`rlpt prm` samples one response per training prompt from the SFT policy, labels each step prefix with
Monte-Carlo rollouts (rlpt.search.labels, N continuations through the engine, by the policy itself or by
`scorer.data.completer`: the labels are the completer's success rates), saves the rows as TRL
stepwise JSONL in the run folder (a resume reuses them), and fits the scorer with BCE on the soft labels.
`rlpt orm` is the same job with the outcome as its only label (no rollouts). Both evaluate against exact
step truth: step AUROC on held-out prompts, and at the end on a harder slice with more operands than any
training prompt (`scorer.data.hard_operands`), plus the AUROC of the MC labels themselves.
`scorer.rank_coef` > 0 adds the within-prompt ranking loss (rlpt.search.scorer.rank_loss) and draws whole
prompts into each batch; it needs several responses per prompt (`scorer.data.responses`).

`rlpt search` runs strategies × budgets on held-out prompts and writes results.jsonl, a table with 95 %
bootstrap intervals (over prompts) and a plot of accuracy against generated tokens per prompt.
"""
from __future__ import annotations

import json
import random
from collections.abc import Collection
from typing import Literal

import torch
from pydantic import Field

from rlpt.config import ConfigError, JobConfig, LoopConfig, OptimConfig, RunConfig, Section, TaskConfig
from rlpt.engine.llm import LLM
from rlpt.gpt_mini.model import load_model
from rlpt.gpt_mini.task import ArithmeticTask, Problem, make_task, parse_prompt
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.loop import SupervisedLoop, open_run
from rlpt.preference.data import distinct_problems
from rlpt.report import figure, fmt, machine, table
from rlpt.run import Run
from rlpt.search.labels import StepRow, auroc, label_auroc, load_rows, mc_labels, sample_responses, save_rows
from rlpt.search.scorer import (
    LogProbScorer,
    StepScorer,
    bce_at,
    boundary_targets,
    last_read,
    load_scorer,
    rank_loss,
    rank_pairs,
)
from rlpt.search.steps import outcome, split_steps, true_step_labels
from rlpt.search.strategies import STRATEGIES, run_strategy


# -- rlpt prm / rlpt orm ---------------------------------------------------------------------------------------
class ScorerData(Section):
    prompts: int = Field(512, ge=1, description="training prompts; one policy response each, its steps labelled")
    heldout_prompts: int = Field(128, ge=1, description="held-out prompts for the step-AUROC eval")
    n: int = Field(8, ge=1, description="Monte-Carlo continuations per step prefix (Math-Shepherd's N)")
    temperature: float = Field(1.0, gt=0, description="of the policy's responses and of the continuations")
    responses: int = Field(1, ge=1, description="responses sampled per training prompt (several: the scorer sees "
                                                "right and wrong answers to the same prompt, as best-of-N must rank)")
    response_temperature: float | None = Field(None, gt=0, description="of the training responses (default: "
                                               "temperature), e.g. the search's; held-out and hard slices keep "
                                               "temperature, so their AUROCs stay comparable")
    completer: str | None = Field(None, description="checkpoint that writes the continuations (default: init_from); "
                                                    "the labels are this policy's success rates")
    max_tokens: int = Field(40, ge=1)
    hard_operands: int = Field(5, ge=1, description="operands of the harder slice evaluated at the end")
    hard_prompts: int = Field(128, ge=1)
    file: str | None = Field(None, description="stepwise JSONL training rows instead of sampling")
    heldout_file: str | None = Field(None, description="stepwise JSONL held-out rows (with file; else 10% of file)")


class ScorerConfig(LoopConfig):
    kind: Literal["prm", "orm"] = "prm"
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1, description="responses per step")
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_steps=10, schedule="cosine")
    ckpt_every: int = Field(100, ge=1)
    eval_every: int = Field(50, ge=1)
    rank_coef: float = Field(0.0, ge=0, description="weight of the within-prompt ranking loss added to BCE "
                             "(pairwise logistic between a prompt's right and wrong responses' final scores); "
                             "> 0 draws whole prompts into a batch, and needs scorer.data.responses > 1")
    logp_feature: bool = Field(False, description="add the trunk's own step / prefix / min token log-probs to the "
                               "head (rlpt.search.scorer.logp_features); starts as the generative verifier")
    logp_aux: str | None = Field(None, description="with logp_feature: a second checkpoint (frozen) whose log-prob "
                                 "features the head reads too; the start is calibrated on 1024 training rows "
                                 "(StepScorer.calibrate)")
    data: ScorerData = ScorerData()


class ScorerJob(JobConfig):
    run: RunConfig = RunConfig(name="prm")
    init_from: str | None = Field(None, description="the SFT policy: answers, completes, and initialises the trunk")
    trunk: str | None = Field(None, description="checkpoint the scorer's trunk starts from instead (default: "
                                                "init_from), e.g. a stronger SFT model that reads arithmetic better")
    scorer: ScorerConfig = ScorerConfig()


def outcome_rows(problems: list[Problem], responses: list[str]) -> list[StepRow]:
    """ORM rows: every step labelled with the outcome (the ORM reads only the last)."""
    rows = []
    for p, r in zip(problems, responses):
        steps, y = split_steps(r), outcome(p, r)
        rows.append(StepRow(p.prompt, steps, [y] * len(steps), [float(y)] * len(steps), true_step_labels(p, r)))
    return rows


def scorer_rows(job: ScorerJob, llm: LLM, run: Run, resume: bool) -> tuple[list[StepRow], list[StepRow], dict]:
    """(train rows, held-out rows, stats), saved in the run folder as stepwise JSONL so a resume reuses them."""
    tr_path, ho_path, st_path = run.dir / "steps.jsonl", run.dir / "steps_heldout.jsonl", run.dir / "labels.json"
    if resume and tr_path.exists() and ho_path.exists() and st_path.exists():
        return load_rows(tr_path), load_rows(ho_path), json.loads(st_path.read_text())
    d, seed = job.scorer.data, job.run.seed
    if d.file:
        train = load_rows(d.file)
        if d.heldout_file:
            held = load_rows(d.heldout_file)
        else:
            random.Random(seed).shuffle(train)
            held, train = train[:max(1, len(train) // 10)], train[max(1, len(train) // 10):]
        stats = {"source": d.file}
    else:
        task, stats = make_task(job.task), {"source": "sampled"}
        completer = LLM(load_model(d.completer), llm.tokenizer, seed=seed) if d.completer else llm
        before = dict(completer.metrics())
        sets = []
        for split, n, s in (("train", d.prompts, seed), ("heldout", d.heldout_prompts, seed + 1)):
            problems = distinct_problems(task, random.Random(s), n, split)
            temp = d.temperature
            if split == "train":     # each copy of a prompt is its own request: its own seed, its own sample
                problems = [p for p in problems for _ in range(d.responses)]
                temp = d.response_temperature or d.temperature
            responses = sample_responses(llm, problems, temp, d.max_tokens, s)
            sets.append(mc_labels(completer, problems, responses, d.n, d.temperature, d.max_tokens, s)
                        if job.scorer.kind == "prm" else outcome_rows(problems, responses))
        train, held = sets
        after = completer.metrics()
        keys = ("tokens/generated", "tokens/prefill", "tokens/shared_by_fork")
        stats |= {k: after[k] - before.get(k, 0) for k in keys}
    train, held = [r for r in train if r.completions], [r for r in held if r.completions]
    if not train or not held:
        raise ConfigError(f"the scorer got {len(train)} training and {len(held)} held-out rows with a step: "
                          "raise scorer.data.prompts / scorer.data.max_tokens")
    save_rows(tr_path, train)
    save_rows(ho_path, held)
    st_path.write_text(json.dumps(stats))
    return train, held, stats


def prompt_groups(rows: list[StepRow]) -> list[list[int]]:
    """Row indices grouped by prompt, in first-seen order (a prompt's responses: the ranking loss's pairs)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.prompt, []).append(i)
    return list(groups.values())


def draw_rows(n_rows: int, groups: list[list[int]], batch_size: int, by_prompt: bool, rng: random.Random
              ) -> list[int]:
    """A training batch's row indices: `batch_size` rows at random (the BCE-only recipe), or, `by_prompt`,
    whole prompts, about batch_size rows' worth, so that a prompt's right and wrong responses meet in it."""
    if not by_prompt:
        return rng.sample(range(n_rows), min(batch_size, n_rows))
    k = min(len(groups), max(1, round(batch_size * len(groups) / n_rows)))
    return [i for g in rng.sample(range(len(groups)), k) for i in groups[g]]


def _batch(scorer: StepScorer, rows: list[StepRow]):
    tok = scorer.tok
    L = scorer.cfg.max_seq_len
    prompts = [tok.encode(r.prompt) for r in rows]
    responses = [tok.encode(r.response)[: max(0, L - len(p))] for p, r in zip(prompts, rows)]
    return boundary_targets(scorer, prompts, responses, [r.soft_labels for r in rows],
                            [float(r.soft_labels[-1]) for r in rows])


@torch.no_grad()
def scorer_metrics(scorer: StepScorer, rows: list[StepRow], suffix: str) -> dict:
    """BCE on the rows' labels; AUROC of the scores against exact step truth (PRM: every step) and of the
    final score against the outcome."""
    was = scorer.training
    scorer.eval()
    ids, target, mask = _batch(scorer, rows)
    bce = bce_at(scorer(ids), target, mask).item()
    scores = scorer.score([(r.prompt, r.response) for r in rows])
    scorer.train(was)
    finals = [s[-1] if s else 0.5 for s in scores]
    outcomes = [outcome(parse_prompt(r.prompt), r.response) for r in rows]
    out = {f"loss/bce_{suffix}": bce, f"{scorer.kind}/outcome_auroc_{suffix}": auroc(finals, outcomes)}
    if scorer.kind == "prm":
        s = [x for sc in scores for x in sc]
        t = [x for r, sc in zip(rows, scores) for x in r.truth[:len(sc)]]
        out[f"prm/step_auroc_{suffix}"] = auroc(s, t)
    return out


def hard_rows(job: ScorerJob, llm: LLM) -> list[StepRow]:
    """Policy responses on the harder slice (more operands than any training prompt), with exact truth."""
    d = job.scorer.data
    task = ArithmeticTask(**{**job.task.model_dump(), "min_operands": d.hard_operands, "max_operands": d.hard_operands})
    problems = distinct_problems(task, random.Random(job.run.seed + 2), d.hard_prompts, "heldout")
    return outcome_rows(problems, sample_responses(llm, problems, d.temperature, d.max_tokens, job.run.seed + 2))


def load_own(path, tok: CharTokenizer):
    """A scorer's trunk or aux model with its own stored config: it need not share the policy's `model.*` keys
    (e.g. a trunk trained with model.rope_theta=1e30, docs/search.md 3d); only the tokenizer must be the same."""
    model = load_model(path)
    if model.cfg.vocab_size != tok.vocab_size:
        raise ConfigError(f"checkpoint {str(path)!r} has vocab_size {model.cfg.vocab_size}, the tokenizer "
                          f"{tok.vocab_size}: a trunk must be a gpt_mini trained on the same character tokenizer")
    return model


def train_scorer(job: ScorerJob, resume: bool = False, allow_change: Collection[str] = ()
                 ) -> tuple[StepScorer, Run, dict]:
    """Train the PRM or ORM as a run folder; returns (scorer, run, final metrics)."""
    if not job.init_from:
        raise ConfigError(f"init_from is required for rlpt {job.scorer.kind}: set init_from=<an SFT checkpoint or "
                          "run folder> (its policy answers and completes the steps, and initialises the trunk)")
    tok, cfg = CharTokenizer(), job.scorer
    run, ckpt = open_run(job, resume, allow_change)
    policy = load_model(job.init_from, job.model, tok)
    llm = LLM(policy, tok, seed=job.run.seed)
    train, held, stats = scorer_rows(job, llm, run, resume=ckpt is not None)
    print(f"[rlpt] {cfg.kind}: {len(train)} training responses, {len(held)} held-out ({stats['source']})")
    hard = hard_rows(job, llm)
    # the policy's weights become the trunk (the engine is done with them), unless another trunk is named
    trunk = load_own(job.trunk, tok) if job.trunk else policy
    if cfg.logp_aux and not cfg.logp_feature:
        raise ConfigError("scorer.logp_aux is read through the log-prob features: set scorer.logp_feature=true")
    aux = load_own(cfg.logp_aux, tok) if cfg.logp_aux else None
    scorer = StepScorer(trunk, tok, cfg.kind, cfg.logp_feature, aux)

    groups = prompt_groups(train)
    if cfg.rank_coef > 0 and len(groups) == len(train):
        raise ConfigError(f"scorer.rank_coef={cfg.rank_coef} compares responses of the same prompt, but every "
                          "training prompt has one response: set scorer.data.responses=4 (or a file with several "
                          "responses per prompt), or scorer.rank_coef=0")

    def loss_fn(rng: random.Random) -> tuple[torch.Tensor, dict]:
        rows = [train[i] for i in draw_rows(len(train), groups, cfg.batch_size, cfg.rank_coef > 0, rng)]
        ids, target, mask = _batch(scorer, rows)
        logits = scorer(ids)                                                  # (B, T), read at the mask
        bce = bce_at(logits, target, mask)
        logs = {"loss/bce": bce.detach(), "positions/step": mask.sum()}
        if cfg.rank_coef == 0:
            return bce, logs
        last, has = last_read(mask)                                          # (B,) each row's final score
        z = logits[torch.arange(len(rows)), last][has]
        correct = torch.tensor([r.soft_labels[-1] == 1.0 for r in rows])[has]   # the verdict: the last label
        ids_of = {p: g for g, p in enumerate(dict.fromkeys(r.prompt for r in rows))}
        group = torch.tensor([ids_of[r.prompt] for r in rows])[has]
        rank = rank_loss(z, correct, group)
        return bce + cfg.rank_coef * rank, logs | {"loss/rank": rank.detach(),
                                                   "rank/pairs": rank_pairs(correct, group).sum()}

    def final_fn() -> dict:
        final = {**scorer_metrics(scorer, held, "heldout"),
                 **scorer_metrics(scorer, hard, f"{cfg.data.hard_operands}ops"),
                 "rows/train": len(train), "rows/heldout": len(held)}
        if cfg.kind == "prm":
            final["labels/mc_auroc_train"] = label_auroc(train)
            final["labels/mc_auroc_heldout"] = label_auroc(held)
        final |= {k: float(v) for k, v in stats.items() if k != "source"}
        run.log(cfg.steps, final)
        return final

    if aux is not None:                  # the product of two verifiers is far off the labels' scale: fit it first
        print(f"[rlpt] {cfg.kind}: start calibrated, scale and shift {scorer.calibrate(*_batch(scorer, train[:1024]))}")
    loop = SupervisedLoop(run, ckpt, scorer, cfg, job.run.seed, meta=scorer.meta())
    if loop.start == 0:
        run.log(0, scorer_metrics(scorer, held, "heldout"))
    show = ("loss/bce", f"{cfg.kind}/{'step' if cfg.kind == 'prm' else 'outcome'}_auroc_heldout")
    final = loop.fit(loss_fn, lambda: scorer_metrics(scorer, held, "heldout"), cfg.eval_every, final_fn,
                     job.run.progress, desc=cfg.kind, show=show)
    return scorer, run, final


# -- rlpt search -----------------------------------------------------------------------------------------------
class SearchSpec(Section):
    strategies: list[str] = Field(["greedy", "majority", "best_of_n", "weighted_best_of_n", "beam", "dvts"],
                                  description=f"any of {STRATEGIES}")
    n: list[int] = Field([4, 16], description="budgets: samples (best-of-N family) or step-samples per iteration")
    agg: Literal["last", "min", "prod"] = Field("last", description="how best-of-N folds step scores")
    width: int = Field(4, ge=1, description="beam: beams kept; dvts: expansions per subtree per step")
    temperature: float = Field(0.8, gt=0, description="of every sample but greedy's; a knob to choose on prompts "
                               "other than the test slice (bench/search_rank.py): each sample's accuracy falls as it "
                               "rises, what voting gains grows with it")
    max_tokens: int = Field(40, ge=1)
    prompts: int = Field(200, ge=1, description="held-out prompts searched")
    bootstrap: int = Field(1000, ge=10, description="bootstrap resamples of the prompts for the 95% intervals")


class SearchJob(Section):
    run: RunConfig = RunConfig(name="search")
    task: TaskConfig = TaskConfig()
    policy: str | None = Field(None, description="the policy's checkpoint or run folder")
    scorer: str | None = Field(None, description="an `rlpt prm` / `rlpt orm` run folder (needed by every "
                                                 "strategy but greedy and majority)")
    verifier: str | None = Field(None, description="instead of a scorer: a policy checkpoint or run folder as a "
                                                   "generative verifier, its own probability of each step prefix "
                                                   "(LogProbScorer; no training, for best-of-N)")
    search: SearchSpec = SearchSpec()


def bootstrap_ci(values: list[float], resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean over resampled items."""
    g = torch.Generator().manual_seed(seed)
    v = torch.tensor(values, dtype=torch.float64)
    idx = torch.randint(0, len(v), (resamples, len(v)), generator=g)
    means = v[idx].mean(1)
    return torch.quantile(means, 0.025).item(), torch.quantile(means, 0.975).item()


def run_search(job: SearchJob) -> tuple[Run, list[dict]]:
    """Every (strategy, n) on the same held-out prompts; -> (run, rows of results)."""
    s = job.search
    bad = [x for x in s.strategies if x not in STRATEGIES]
    if bad:
        raise ConfigError(f"search.strategies has {bad}: each must be one of {list(STRATEGIES)}")
    if not job.policy:
        raise ConfigError("rlpt search needs policy=<an SFT checkpoint or run folder>")
    needs = [x for x in s.strategies if x not in ("greedy", "majority")]
    if job.scorer and job.verifier:
        raise ConfigError("set scorer=<an rlpt prm / orm run> or verifier=<a policy checkpoint>, not both")
    if needs and not (job.scorer or job.verifier):
        raise ConfigError(f"search.strategies {needs} need a scorer: set scorer=<an rlpt prm / rlpt orm run folder> "
                          "or verifier=<a policy checkpoint> (its own probability of each step)")
    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    tok = CharTokenizer()
    llm = LLM(load_model(job.policy), tok, seed=job.run.seed)
    scorer = load_scorer(job.scorer, tok) if job.scorer else \
        LogProbScorer(load_model(job.verifier), tok) if job.verifier else None
    prompts = [p.prompt for p in make_task(job.task).heldout_set(s.prompts)]
    run = Run(job.run.out_dir, job.run.name, job)
    rows = []
    for name in s.strategies:
        for n in ([1] if name == "greedy" else s.n):
            res = run_strategy(name, llm, prompts, n, scorer, s.agg, s.width, s.temperature, s.max_tokens,
                               job.run.seed)
            acc = [float(r.correct) for r in res]
            lo, hi = bootstrap_ci(acc, s.bootstrap, job.run.seed)
            rows.append({"strategy": name, "n": n, "acc": sum(acc) / len(acc), "ci_low": lo, "ci_high": hi,
                         "tokens_per_prompt": sum(r.tokens for r in res) / len(res), "correct": acc})
            print(f"[rlpt] search {name} n={n}: acc {rows[-1]['acc']:.3f} [{lo:.3f}, {hi:.3f}], "
                  f"{rows[-1]['tokens_per_prompt']:.0f} tokens/prompt", flush=True)
    (run.dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_search_report(run, job, rows)
    run.close()                                  # frees the run folder's lock
    return run, rows


def write_search_report(run: Run, job: SearchJob, rows: list[dict]) -> None:
    with figure(run.dir / "accuracy_vs_tokens.png") as ax:
        for name in dict.fromkeys(r["strategy"] for r in rows):
            pts = [r for r in rows if r["strategy"] == name]
            ax.errorbar([r["tokens_per_prompt"] for r in pts], [r["acc"] for r in pts],
                        yerr=[[r["acc"] - r["ci_low"] for r in pts], [r["ci_high"] - r["acc"] for r in pts]],
                        marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("generated tokens per prompt")
        ax.set_ylabel("accuracy (95% bootstrap CI)")
        ax.legend(fontsize=8)
    lines = [f"# Search: {run.dir.name}", "", f"Measured on {machine()}.", "",
             f"Policy `{job.policy}`, scorer `{job.scorer or f'logprob of {job.verifier}'}`, "
             f"{job.search.prompts} held-out prompts "
             f"({job.task.min_operands}-{job.task.max_operands} operands), agg={job.search.agg}, "
             f"width={job.search.width}, temperature {job.search.temperature}.", "",
             "| strategy | n | accuracy | 95% CI | tokens/prompt |", "|---|---:|---:|---|---:|"]
    lines += [f"| {r['strategy']} | {r['n']} | {r['acc']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
              f"{r['tokens_per_prompt']:.1f} |" for r in rows]
    lines += ["", "![accuracy against generated tokens](accuracy_vs_tokens.png)", ""]
    (run.dir / "report.md").write_text("\n".join(lines))


def search_table(rows: list[dict]) -> str:
    return table([(f"{r['strategy']} n={r['n']}", f"{fmt(r['acc'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}] "
                   f"{r['tokens_per_prompt']:.0f} tok") for r in rows], ("strategy", "accuracy [95% CI] tokens"))
