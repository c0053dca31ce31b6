"""`rlpt data curate`: lesson 18a's offline stages chained over one prompt set, into a run folder.

    read -> exact dedup -> near dedup (MinHash) -> decontaminate (8/13-grams) -> answer check -> fits
         -> pass rate (K samples, the policy) -> band filter (low < p̂ < high) -> stratified mix

The stratified mix (the course's stage 6) samples the kept rows to target shares of strata: by source, by the
pass-rate bucket or p̂, or by a metadata key (`mix.by`). With shares t_s (normalised to sum 1) and n_s rows
available in stratum s, the mix keeps

    N = mix.size, or (when 0) the largest N with t_s N <= n_s for every s: min_s floor(n_s / t_s)
    N_s = t_s N apportioned by largest remainder (Hamilton), at most n_s (a row is never repeated)

rows of each stratum, a seeded random subset in file order, and reports every stratum's n_s, t_s, N_s and kept.

Each stage reports its counts in and out and a few examples of what it removed (with the reason). The run
folder holds curated.jsonl (the kept rows, their p̂ in metadata), removed.jsonl (every dropped row, its stage and
reason), pass_rates.jsonl (p̂, Wilson interval, bucket per prompt), config.yaml, pass_rate_hist.png and
report.md with the course's stage-5 alarm (> 40 % of the mass outside [0.05, 0.95]) and the widget's
"compute wasted" Σ K(p^K + (1-p)^K) / Σ K before and after the band.

The answer check is the course's verifier-feasibility test (stage 3) in its cheap form: the env's verifier must
accept the gold answer and reject a distractor (gold + 1, when the gold is a number). Without a policy the
pass-rate and band stages are skipped (the report says so).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

from pydantic import Field, model_validator

from rlpt.config import ConfigError, RunConfig, Section, quote
from rlpt.data.decontam import EvalIndex, decontaminate
from rlpt.data.dedup import Removed, exact_dedup, near_dedup
from rlpt.data.difficulty import PassRate, in_band, pass_rates
from rlpt.data.prompts import PromptRow, read_prompts, write_prompts
from rlpt.data.signal import signal, wasted_fraction
from rlpt.framework.environment import Prompt, make_env, safe_verify


class DedupConfig(Section):
    threshold: float = Field(0.8, gt=0, le=1, description="MinHash Jaccard above which two prompts are duplicates "
                                                          "(0.8 the pretraining default, 0.7 aggressive)")
    num_perm: int = Field(128, ge=16, description="MinHash permutations")
    shingle: int = Field(3, ge=1, description="word n-gram size of the shingles")


class DifficultyConfig(Section):
    k: int = Field(8, ge=2, description="samples per prompt (the course's stratification probe: K = 8)")
    temperature: float = Field(1.0, gt=0)
    max_tokens: int = Field(24, ge=1, description="longest response sampled")
    low: float = Field(0.0, ge=0, le=1, description="keep prompts with low < p̂ < high")
    high: float = Field(1.0, ge=0, le=1, description="keep prompts with low < p̂ < high")

    @model_validator(mode="after")
    def _band(self):
        if self.low >= self.high:
            raise ValueError("difficulty.low must be < difficulty.high (the band keeps low < p̂ < high)")
        return self


class MixConfig(Section):
    by: list[str] = Field(default_factory=list, description="stratify the kept rows by these keys: 'source', "
                          "'bucket' (too_hard/train/too_easy), 'p_hat' (as successes/K), or a metadata key; "
                          "empty: no mix stage")
    targets: dict[str, float] = Field(default_factory=dict, description="stratum -> target share (normalised to "
                                      "sum 1); a stratum is its keys' values joined by '/'; empty: equal shares of "
                                      "the strata present")
    size: int = Field(0, ge=0, description="rows the mix keeps; 0: the most the shares allow without repeating a row")

    @model_validator(mode="after")
    def _needs_by(self):
        if (self.targets or self.size) and not self.by:
            raise ValueError("mix.targets / mix.size are set but mix.by is empty: name the keys to stratify by, "
                             "e.g. mix.by=[source]")
        return self


class CurateJob(Section):
    """`rlpt data curate`'s schema: the input, the policy and eval sets (also the command's arguments), each
    stage's settings, and the run folder."""
    run: RunConfig = RunConfig(name="curate")
    input: str | None = Field(None, description="the prompt set: JSONL, Parquet or hf:owner/name")
    policy: str | None = Field(None, description="checkpoint or run folder whose pass rates decide difficulty "
                                                 "(none: the pass-rate and band stages are skipped)")
    eval: list[str] = Field(default_factory=list, description="eval sets to decontaminate against, each "
                                                              "PATH or NAME=PATH")
    env: str = Field("arithmetic", description="the registered env whose verifier scores the samples")
    ngrams: list[int] = Field([8, 13], min_length=1, description="decontamination word n-gram sizes")
    dedup: DedupConfig = DedupConfig()
    difficulty: DifficultyConfig = DifficultyConfig()
    mix: MixConfig = MixConfig()
    examples: int = Field(5, ge=0, description="removed rows quoted per stage in the report")


@dataclass
class Stage:
    name: str
    n_in: int
    n_out: int
    removed: list[Removed] = field(default_factory=list)
    note: str = ""
    strata: list[dict] = field(default_factory=list)     # the mix: one {stratum, available, share, wanted, kept}


# a gold answer as the env's verifier compares it (the arithmetic env checks an integer)
GOLD = {"arithmetic": int, "calculator": int}


def _eval_sets(specs: list[str]) -> dict[str, list[str]]:
    sets = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else (Path(spec).stem, "", spec)
        if name in sets:
            raise ConfigError(f"two eval sets are named {quote(name)}: name them, e.g. --eval other={path}")
        sets[name] = [r.prompt for r in read_prompts(path)]
    return sets


def answer_check(rows: list[PromptRow], env, gold) -> tuple[list[PromptRow], list[Removed]]:
    """The verifier accepts the gold answer and rejects gold + 1 (stage 3's gold / distractor test)."""
    kept, removed = [], []
    for r in rows:
        try:
            g = gold(r.answer)
        except (ValueError, TypeError):
            removed.append(Removed(r, f"answer {quote(r.answer, 40)} is not what the {gold.__name__} verifier reads"))
            continue
        p = Prompt(r.prompt, [], g, dict(r.metadata))
        if safe_verify(env, p, r.answer).reward != 1.0:
            removed.append(Removed(r, "the verifier rejects the gold answer"))
            continue
        try:
            wrong = str(Fraction(r.answer.strip()) + 1)
        except (ValueError, ZeroDivisionError):
            wrong = None
        if wrong is not None and safe_verify(env, p, wrong).reward != 0.0:
            removed.append(Removed(r, f"the verifier accepts the wrong answer {wrong}"))
            continue
        kept.append(r)
    return kept, removed


def fits(rows: list[PromptRow], tok, max_seq_len: int, max_tokens: int) -> tuple[list[PromptRow], list[Removed]]:
    """The policy can read the prompt (its tokenizer) and answer it (prompt + max_tokens within its context)."""
    kept, removed = [], []
    for r in rows:
        try:
            n = len(tok.encode(r.prompt))
        except ValueError as e:
            removed.append(Removed(r, f"the policy's tokenizer cannot read it ({str(e)[:80]})"))
            continue
        if n + max_tokens > max_seq_len:
            removed.append(Removed(r, f"{n} prompt tokens + {max_tokens} to answer > the policy's {max_seq_len}"))
        else:
            kept.append(r)
    return kept, removed


def stratum(row: PromptRow, keys: list[str]) -> str:
    """A row's stratum: its values of `keys` joined by '/' (module doc); a key the row lacks is an error."""
    from rlpt.data.difficulty import bucket
    out = []
    for key in keys:
        m = row.metadata
        if key == "source":
            out.append(row.source or "(none)")
        elif key in ("bucket", "p_hat"):
            if "p_hat" not in m or "k" not in m:
                raise ConfigError(f"mix.by={key} needs each row's pass rate, but row {quote(row.id)} has none: give "
                                  "--policy (the pass-rate stage) or stratify by source or a metadata key")
            out.append(bucket(m["p_hat"]) if key == "bucket" else f"{round(m['p_hat'] * m['k'])}/{m['k']}")
        elif key in m:
            out.append(str(m[key]))
        else:
            raise ConfigError(f"mix.by={key}: row {quote(row.id)} has no metadata key {quote(key)} (known keys: "
                              f"source, bucket, p_hat, {', '.join(sorted(m)) or 'no metadata'})")
    return "/".join(out)


def apportion(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Hamilton's largest-remainder rounding of total · share (shares sum to 1): the counts sum to `total`; ties
    go to the stratum named first."""
    exact = {s: total * t for s, t in shares.items()}
    counts = {s: int(x) for s, x in exact.items()}
    order = sorted(shares, key=lambda s: (-(exact[s] - counts[s]), list(shares).index(s)))
    for s in order[:total - sum(counts.values())]:
        counts[s] += 1
    return counts


def stratified_mix(rows: list[PromptRow], keys: list[str], targets: dict[str, float], size: int = 0,
                   seed: int = 0) -> tuple[list[PromptRow], list[Removed], list[dict]]:
    """Sample `rows` to target shares of strata (module doc): (kept rows in input order, removed, per-stratum
    counts). A target naming a stratum no row has, or a share < 0, is an error."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(stratum(r, keys), []).append(i)
    if targets:
        bad = [s for s in targets if s not in groups]
        if bad:
            raise ConfigError(f"mix.targets names {quote(bad[0])}, which no row is in (strata by "
                              f"{'/'.join(keys)}: {', '.join(sorted(groups))})")
        if any(t < 0 for t in targets.values()) or sum(targets.values()) <= 0:
            raise ConfigError(f"mix.targets must be shares >= 0 with a positive sum, got {targets}")
    raw = targets or {s: 1.0 for s in groups}
    shares = {s: raw.get(s, 0.0) / sum(raw.values()) for s in groups}
    if not size:     # min_s floor(n_s / t_s), with room for the rounding of t_s (30 / 0.3 = 99.99999999999999)
        size = min(math.floor(len(groups[s]) / t + 1e-9) for s, t in shares.items() if t > 0)
    wanted = apportion(size, shares)
    rng, keep, counts = random.Random(seed), set(), []
    for s, idx in groups.items():
        chosen = sorted(rng.sample(idx, min(wanted[s], len(idx))))
        keep.update(chosen)
        counts.append({"stratum": s, "available": len(idx), "share": shares[s], "wanted": wanted[s],
                       "kept": len(chosen)})
    why = {c["stratum"]: f"stratum {c['stratum']}: {c['kept']} of {c['available']} kept for a share of "
                         f"{c['share']:.3f}" for c in counts}
    removed = [Removed(r, why[stratum(r, keys)]) for i, r in enumerate(rows) if i not in keep]
    return [r for i, r in enumerate(rows) if i in keep], removed, counts


def curate(job: CurateJob) -> tuple[Path, list[Stage], list[PassRate]]:
    """Run the stages; write the run folder; return (folder, stages, pass rates of the prompts scored)."""
    import rlpt.envs  # noqa: F401 - registers the envs named by job.env
    from rlpt.run import Run
    if job.run.threads:
        import torch
        torch.set_num_threads(job.run.threads)
    if not job.input:
        raise ConfigError("no input prompt set: rlpt data curate IN.jsonl (or input=PATH)")
    rows = read_prompts(job.input)
    evals = _eval_sets(job.eval)
    stages: list[Stage] = [Stage("read", len(rows), len(rows), note=_sources(rows))]
    gold = GOLD.get(job.env, str)
    try:
        env = make_env(job.env)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None

    def step(name, fn, *args, note=""):
        nonlocal rows
        n_in = len(rows)
        rows, removed = fn(rows, *args)
        stages.append(Stage(name, n_in, len(rows), removed, note))

    step("exact dedup", exact_dedup, note="normalised text")
    d = job.dedup
    step("near dedup", lambda rs: near_dedup(rs, d.threshold, d.num_perm, d.shingle),
         note=f"MinHash LSH, Jaccard >= {d.threshold}, word {d.shingle}-grams, {d.num_perm} permutations")
    index = EvalIndex(tuple(job.ngrams))
    for name, texts in evals.items():
        index.add(name, texts)
    step("decontaminate", decontaminate, index,
         note=(", ".join(f"{n} ({len(t)} rows)" for n, t in evals.items()) or "no eval set given") +
              f"; word {'/'.join(map(str, job.ngrams))}-grams")
    step("answer check", answer_check, env, gold, note=f"env {job.env}: gold accepted, gold + 1 rejected")
    rates: list[PassRate] = []
    if job.policy:
        rows, rates = _difficulty(job, rows, env, gold, stages)
    else:
        stages.append(Stage("pass rate", len(rows), len(rows), note="skipped: no --policy"))
    by_id = {p.id: p for p in rates}
    rows = [replace(r, metadata={**r.metadata, "p_hat": by_id[r.id].p_hat, "k": by_id[r.id].k})
            if r.id in by_id else r for r in rows]
    if job.mix.by:
        n_in = len(rows)
        rows, removed, strata = stratified_mix(rows, job.mix.by, job.mix.targets, job.mix.size, job.run.seed)
        short = [f"{c['stratum']} short by {c['wanted'] - c['kept']}" for c in strata if c["kept"] < c["wanted"]]
        stages.append(Stage("stratified mix", n_in, len(rows), removed,
                            f"by {'/'.join(job.mix.by)}, " + ", ".join(f"{c['stratum']} {c['kept']}" for c in strata)
                            + (f" ({'; '.join(short)})" if short else ""), strata))

    run = Run(job.run.out_dir, job.run.name, job)
    try:
        run.begin(0, 1)
        write_prompts(run.dir / "curated.jsonl", rows)
        (run.dir / "removed.jsonl").write_text("".join(
            json.dumps({"stage": s.name, "reason": x.reason, **json.loads(x.row.to_json())}, ensure_ascii=False) + "\n"
            for s in stages for x in s.removed), encoding="utf-8")
        (run.dir / "pass_rates.jsonl").write_text("".join(json.dumps(p.as_dict()) + "\n" for p in rates))
        write_curate_report(run.dir, job, stages, rates)
    finally:
        run.close()
    return run.dir, stages, rates


def _sources(rows: list[PromptRow]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.source] = counts.get(r.source, 0) + 1
    return "sources: " + ", ".join(f"{s or '(none)'} {n}" for s, n in sorted(counts.items()))


def _difficulty(job: CurateJob, rows: list[PromptRow], env, gold,
                stages: list[Stage]) -> tuple[list[PromptRow], list[PassRate]]:
    """The fits, pass-rate and band stages: (the rows the band keeps, every scored row's pass rate)."""
    from rlpt.engine.llm import LLM
    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    tok, d = CharTokenizer(), job.difficulty
    model = load_model(job.policy)
    n_in = len(rows)
    rows, removed = fits(rows, tok, model.cfg.max_seq_len, d.max_tokens)
    stages.append(Stage("fits the policy", n_in, len(rows), removed, note=f"context {model.cfg.max_seq_len}"))
    rates = pass_rates(LLM(model, tok, seed=job.run.seed), env, rows, d.k, d.temperature, d.max_tokens,
                       job.run.seed, gold) if rows else []
    by_id = {p.id: p for p in rates}
    kept = [r for r in rows if in_band(by_id[r.id].p_hat, d.low, d.high)]
    removed = [Removed(r, f"p̂ = {by_id[r.id].successes}/{d.k} ({by_id[r.id].bucket}), outside "
                          f"{d.low} < p̂ < {d.high}") for r in rows if not in_band(by_id[r.id].p_hat, d.low, d.high)]
    stages.append(Stage("pass-rate band", len(rows), len(kept), removed,
                        note=f"K = {d.k}, T = {d.temperature}, policy {job.policy}"))
    return kept, rates


def summary(rates: list[PassRate], job: CurateJob) -> dict:
    """The stage-5 dashboard numbers over the prompts scored, and over those the band kept."""
    d = job.difficulty
    ps = [p.p_hat for p in rates]
    kept = [p for p in ps if in_band(p, d.low, d.high)]
    out = {"prompts scored": len(ps), "mean p̂": sum(ps) / len(ps) if ps else 0.0}
    for b in ("too_hard", "train", "too_easy"):
        out[f"bucket {b}"] = sum(p.bucket == b for p in rates)
    out["mass outside [0.05, 0.95]"] = (out["bucket too_hard"] + out["bucket too_easy"]) / len(ps) if ps else 0.0
    out["compute wasted (all scored)"] = wasted_fraction(ps, d.k)
    out["compute wasted (band kept)"] = wasted_fraction(kept, d.k)
    out["mean signal p(1-p)(K-1)/K (all)"] = sum(signal(p, d.k) for p in ps) / len(ps) if ps else 0.0
    out["mean signal (band kept)"] = sum(signal(p, d.k) for p in kept) / len(kept) if kept else 0.0
    return out


def write_curate_report(folder: Path, job: CurateJob, stages: list[Stage], rates: list[PassRate]) -> Path:
    from rlpt.report import figure, fmt, machine, table
    parts = [f"# Curation (lesson 18a): {folder.name}", "", f"Measured on {machine()}.", "",
             f"Input {job.input}; policy {job.policy or '(none)'}; kept {stages[-1].n_out} of {stages[0].n_in} "
             "rows (curated.jsonl).", "",
             "| stage | in | out | removed | how |", "|---|---:|---:|---:|---|"]
    parts += [f"| {s.name} | {s.n_in} | {s.n_out} | {s.n_in - s.n_out} | {s.note} |" for s in stages]
    parts.append("")
    for s in stages:
        if s.removed and job.examples:
            parts += [f"**{s.name}**, removed for example:", ""]
            parts += [f"- `{x.row.id}` {quote(x.row.prompt, 80)}: {x.reason}" for x in s.removed[:job.examples]]
            parts.append("")
    for s in stages:
        if s.strata:
            parts += [f"## {s.name.capitalize()} (by {'/'.join(job.mix.by)})", "",
                      "| stratum | available | target share | wanted | kept |", "|---|---:|---:|---:|---:|"]
            parts += [f"| {c['stratum']} | {c['available']} | {c['share']:.3f} | {c['wanted']} | {c['kept']} |"
                      for c in s.strata]
            parts.append("")
    if rates:
        k = job.difficulty.k
        stats = summary(rates, job)
        parts += ["## Pass rates", "", table([(a, fmt(b)) for a, b in stats.items()]), ""]
        if stats["mass outside [0.05, 0.95]"] > 0.4:
            parts += ["**Alarm** (lesson 18a, stage 5): more than 40 % of the prompts are outside [0.05, 0.95] for "
                      "this policy.", ""]
        with figure(folder / "pass_rate_hist.png", size=(6, 3.5)) as ax:
            ax.hist([p.p_hat for p in rates], bins=[(j - 0.5) / k for j in range(k + 2)], edgecolor="black")
            ax.set_xlabel(f"p̂ (K = {k})")
            ax.set_ylabel("prompts")
            ax.set_title("pass rate of each prompt under the policy")
        parts += ["![pass rates](pass_rate_hist.png)", ""]
    path = folder / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
