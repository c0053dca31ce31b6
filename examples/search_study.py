"""Lesson 17 on the arithmetic chain-of-thought task, where every step's truth is known exactly.

    python examples/search_study.py [--report-only] [--skip-rl]       -> docs/search.md, docs/search_*.png

Runs under runs/search_study/ (each reused when finished, continued when interrupted):
  policy/     rlpt sft sft.format=cot sft.steps=200        the imperfect CoT policy searched over
  completer/  rlpt sft sft.format=cot sft.steps=600        a strong completer for the Monte-Carlo labels
  prm/        rlpt prm init_from=policy scorer.data.completer=completer
  orm/        rlpt orm init_from=policy                     (same prompts, the verdict as the only label)
  prm_ctrunk/ prm_ctrunk_1200/ prm_1kx4/ prm_strong/   PRM variants, one lever each (VARIANTS: trunk =
              completer, more steps, samples drawn as search draws them, more of them)
  mc.json     MC label AUROC against exact step truth at N = 8, per completer
  search.json strategies × N ∈ {4, 16, 64} on held-out 4-operand prompts, tokens spent, per-prompt outcomes,
              and per scorer how it ranks the search's own candidates (pooled and within-prompt AUROC)
  grpo_{outcome,process}_s{0,1,2}/   rlpt train from the policy: env arithmetic vs env prm (3 seeds)

The page reads every number from these files; nothing is typed in by hand.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
from common import DOCS, ROOT, f3, read_rows, run_stage, series

from rlpt.config import load_config
from rlpt.report import figure, machine

OUT = ROOT / "runs" / "search_study"
POLICY_STEPS, COMPLETER_STEPS = 200, 600
NS = (4, 16, 64)
SLICE = 4                  # operands of the searched slice (the policy's greedy accuracy there is 30-70 %)
PROMPTS = 300
WIDTH = 4                  # beam: beams kept; DVTS: expansions per subtree
TEMP = 0.8
SEEDS = (0, 1, 2)
RL = ["steps=30", "rollout.prompts_per_step=16", "rollout.k=8", "eval.every=5", "eval.size=300",
      "trainer.optim.lr=5e-5", "trainer.optim.schedule=cosine", "trainer.mini_batches=2", "rollout.temperature=0.7",
      "rollout.max_tokens=32", "run.progress=false", "run.threads=1"]
# 1024 responses gave a PRM that underfit (held-out step AUROC 0.81 after 300 steps at lr 1e-4, overfit at 5e-4)
SCORER = ["scorer.data.prompts=4096", "scorer.data.heldout_prompts=256", "scorer.data.hard_prompts=256",
          "scorer.steps=600", "scorer.batch_size=64", "scorer.optim.lr=2e-4", "scorer.eval_every=100"]
TARGET_GAIN = 0.05         # "steps to target": first eval at >= start + this
# PRM variants, one lever each on top of the one before (run folder: what it changes, its overrides)
VARIANTS = {
    # samples and labels its own rows: the same policy, prompts, seeds and completer as prm, so the same rows as
    # prm's, without needing the prm stage first (bench/search_rank.py trains it alone)
    "prm_ctrunk": ("trunk = the strong completer, the same labelled rows as prm", ["trunk={completer}"]),
    "prm_ctrunk_1200": ("as prm_ctrunk, 1200 steps (was it still rising at 600?)",
                        ["trunk={completer}", "scorer.data.file={out}/prm_ctrunk/steps.jsonl",
                         "scorer.data.heldout_file={out}/prm_ctrunk/steps_heldout.jsonl", "scorer.steps=1200",
                         "scorer.eval_every=200"]),
    "prm_1kx4": ("trunk = the completer, 1024 prompts × 4 responses at the search's temperature 0.8",
                 ["trunk={completer}", "scorer.data.prompts=1024", "scorer.data.responses=4",
                  f"scorer.data.response_temperature={TEMP}"]),
    "prm_strong": ("trunk = the completer, 4096 prompts × 4 responses at temperature 0.8",
                   ["trunk={completer}", "scorer.data.responses=4", f"scorer.data.response_temperature={TEMP}"]),
}
GEN = "completer_logprob" # the strong completer's probability of each candidate, no training (a ceiling)
BEST = "prm_ctrunk"        # the PRM the search section's beam and DVTS also run with


def sft(name: str, steps: int) -> Path:
    from rlpt.sft import SFTJob, train_sft
    job = load_config(SFTJob, None, ["sft.format=cot", f"sft.steps={steps}", "eval.size=200", f"eval.every={steps}",
                                     f"run.out_dir={OUT}", f"run.name={name}", "run.threads=1", "run.progress=false"])
    return run_stage(name, OUT / name, steps, lambda resume: train_sft(job, resume=resume))


def scorer(kind: str, policy: Path, completer: Path, name: str | None = None, extra: list[str] = ()) -> Path:
    from rlpt.search.jobs import ScorerJob, train_scorer
    name = name or kind
    over = [f"init_from={policy}", f"scorer.kind={kind}", *SCORER, f"run.out_dir={OUT}", f"run.name={name}",
            "run.threads=1", "run.progress=false", *(x.format(completer=completer, out=OUT) for x in extra)]
    if kind == "prm":
        over.append(f"scorer.data.completer={completer}")
    job = load_config(ScorerJob, None, over)
    return run_stage(name, OUT / name, job.scorer.steps, lambda resume: train_scorer(job, resume=resume))


def mc_study(policy: Path, completer: Path) -> dict:
    """AUROC of MC soft labels (N = 8) against exact truth, with the policy itself and the strong completer
    as completers, on the same 512 sampled responses; and what the engine shared."""
    from rlpt.engine import LLM
    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.task import ArithmeticTask
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.preference.data import distinct_problems
    from rlpt.search.labels import label_auroc, mc_labels, sample_responses
    tok = CharTokenizer()
    pol = LLM(load_model(policy), tok)
    problems = distinct_problems(ArithmeticTask(), random.Random(7), 512, "heldout")
    responses = sample_responses(pol, problems, 1.0, 40, 7)
    out = {}
    for name, path in (("policy", policy), ("completer", completer)):
        llm = LLM(load_model(path), tok)
        t0 = time.perf_counter()
        rows = mc_labels(llm, problems, responses, 8, 1.0, 40, 7)
        m = llm.metrics()
        steps = sum(len(r.completions) - 1 for r in rows)
        out[name] = {"auroc": label_auroc(rows), "prefixes": steps, "seconds": time.perf_counter() - t0,
                     "tokens_generated": m["tokens/generated"], "tokens_prefill": m["tokens/prefill"],
                     "tokens_shared_by_fork": m["tokens/shared_by_fork"],
                     "wrong_prefixes": sum(not t for r in rows for t in r.truth[:-1])}
    return out


def search_study(policy: Path, completer: Path, done: dict) -> dict:
    """Every strategy on the same held-out 4-operand prompts. The best-of-N family shares one set of 64
    samples per prompt (the first N are used at budget N), so their comparisons are paired. Results already
    in `done` (a previous search.json) are kept: delete a key to recompute it."""
    from rlpt.engine import LLM
    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.task import ArithmeticTask, parse_prompt
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.search.labels import auroc
    from rlpt.search.scorer import LogProbScorer, OracleScorer, load_scorer
    from rlpt.search.steps import outcome
    from rlpt.search.strategies import (
        beam_search,
        dvts,
        greedy,
        pick_best,
        pick_majority,
        pick_weighted,
        sample,
        score_samples,
    )
    tok = CharTokenizer()
    llm = LLM(load_model(policy), tok, max_num_seqs=256)
    scorers = {k: load_scorer(OUT / k, tok) for k in ("prm", "orm", *VARIANTS)}
    scorers[GEN] = LogProbScorer(load_model(completer), tok)     # the generative verifier: a ceiling
    prompts = [p.prompt for p in ArithmeticTask(min_operands=SLICE, max_operands=SLICE).heldout_set(PROMPTS)]
    res: dict[str, dict] = dict(done.get("results", {}))
    selection: dict = dict(done.get("selection", {}))
    if done and done["prompts"] != prompts:
        raise SystemExit("search.json was made on other prompts: delete it")

    def keep(name, n, results, seconds):
        res[f"{name}@{n}"] = {"strategy": name, "n": n, "correct": [int(r.correct) for r in results],
                              "tokens": [r.tokens for r in results], "seconds": seconds}
        acc = sum(r.correct for r in results) / len(results)
        print(f"[search_study] {name} n={n}: acc {acc:.3f}, {sum(r.tokens for r in results) / len(results):.0f} "
              f"tokens/prompt ({seconds:.0f}s)", flush=True)

    t0 = time.perf_counter()
    if "greedy@1" not in res:
        keep("greedy", 1, greedy(llm, prompts), time.perf_counter() - t0)
    # the best-of-N family, from one set of samples (drawn again, identically, when a scorer is new)
    if any(f"weighted {k}@{n}" not in res for k in scorers for n in NS) or set(selection) != {*scorers, "random"}:
        t0 = time.perf_counter()
        samples = sample(llm, prompts, max(NS), TEMP, 40, seed=0)
        t_sample = time.perf_counter() - t0
        oracle = score_samples(OracleScorer(), samples)
        truth = [[outcome(parse_prompt(s.prompt), t) for t in s.texts] for s in samples]
        selection["random"] = {"acc": sum(map(sum, truth)) / sum(map(len, truth)),
                               "complete": sum(t.endswith("#") for s in samples for t in s.texts)
                               / sum(map(len, truth)),
                               "len": sum(len(t) for s in samples for t in s.texts) / sum(map(len, truth)),
                               "share": sum(s.texts.count(t) / len(s.texts) for s in samples for t in s.texts)
                               / sum(map(len, truth))}
        for n in NS:
            sub = [s.first(n) for s in samples]
            keep("majority", n, [pick_majority(s) for s in sub], t_sample)
            keep("pass@n (oracle)", n, [pick_best(s, o[:n]) for s, o in zip(sub, oracle)], t_sample)
        for k, scorer_k in scorers.items():
            scores = score_samples(scorer_k, samples)
            finals = [[x[-1] if x else 0.0 for x in sc] for sc in scores]
            within = [a for a in (auroc(f, y) for f, y in zip(finals, truth)) if a == a]   # nan: one class
            picked = [pick_best(s, sc) for s, sc in zip(samples, scores)]
            selection[k] = {"pooled_auroc": auroc(sum(finals, []), sum(truth, [])),
                            "within_auroc": sum(within) / len(within), "within_prompts": len(within),
                            "pick64_complete": sum(r.text.endswith("#") for r in picked) / len(picked),
                            "pick64_len": sum(len(r.text) for r in picked) / len(picked),
                            # how common the chosen text is among its prompt's 64 samples (a sample's own: below)
                            "pick64_share": sum(s.texts.count(r.text) / len(s.texts)
                                                for s, r in zip(samples, picked)) / len(picked)}
            for n in NS:
                sub = [s.first(n) for s in samples]
                for agg in ("last", "min", "prod"):
                    keep(f"best_of_n {k} {agg}", n, [pick_best(s, sc[:n], agg) for s, sc in zip(sub, scores)],
                         t_sample)
                keep(f"weighted {k}", n, [pick_weighted(s, sc[:n], "last") for s, sc in zip(sub, scores)], t_sample)
    for k in ("prm", BEST):
        for n in NS:
            if f"beam {k}@{n}" not in res:
                t0 = time.perf_counter()
                keep(f"beam {k}", n, beam_search(llm, scorers[k], prompts, n, min(WIDTH, n), TEMP, seed=1),
                     time.perf_counter() - t0)
            if f"dvts {k}@{n}" not in res:
                t0 = time.perf_counter()
                keep(f"dvts {k}", n, dvts(llm, scorers[k], prompts, n, max(1, n // WIDTH), TEMP, seed=2),
                     time.perf_counter() - t0)
    if "completer greedy@1" not in res:      # the ceiling of a verifier that adds as well as the completer
        t0 = time.perf_counter()
        keep("completer greedy", 1, greedy(LLM(load_model(completer), tok), prompts), time.perf_counter() - t0)
    return {"prompts": prompts, "results": res, "selection": selection}


def rl_study(policy: Path, prm: Path) -> dict:
    from rlpt.train import load_train_job, run_train
    dirs = {}
    for arm, env in (("outcome", ["env.name=arithmetic"]), ("process", ["env.name=prm", f"env.model_path={prm}"])):
        for s in SEEDS:
            name = f"grpo_{arm}_s{s}"
            job = load_train_job(None, [*RL, *env, f"init_from={policy}", f"run.seed={s}", f"run.out_dir={OUT}",
                                        f"run.name={name}", "algorithm.name=grpo"])
            run_stage(name, OUT / name, job.steps, lambda resume, job=job: run_train(job, resume=resume))
            dirs[name] = str(OUT / name)
    return dirs


# -- the page ---------------------------------------------------------------------------------------------
def boot(values: list[list[float]], resamples: int = 2000, seed: int = 0) -> list[tuple[float, float, float]]:
    """Per series: (mean, 2.5 %, 97.5 %) over prompts resampled together (one index draw for all: paired)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.tensor(values, dtype=torch.float64)                        # (S, P)
    idx = torch.randint(0, v.shape[1], (resamples, v.shape[1]), generator=g)
    means = v[:, idx].mean(-1)                                           # (S, resamples)
    lo, hi = torch.quantile(means, 0.025, dim=1), torch.quantile(means, 0.975, dim=1)
    return [(float(m), float(a), float(b)) for m, a, b in zip(v.mean(1), lo, hi)]


def ci(x: tuple[float, float, float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(x[0])} [{f.format(x[1])}, {f.format(x[2])}]"


def diff(res: dict, a: str, b: str) -> tuple[float, float, float]:
    ca, cb = res[a]["correct"], res[b]["correct"]
    return boot([[x - y for x, y in zip(ca, cb)]])[0]


# Greedy chains of the policy on searched prompts, with the right last sum and a wrong one: what the PRM's
# last score (the one best-of-N "last" and the beam rank by) makes of the final addition.
PROBES = [("<0+5+2+7>", "0+5=5,5+2=7,7+7=14#", "0+5=5,5+2=7,7+7=15#"),
          ("<8+6+2+9>", "8+6=14,14+2=16,16+9=25#", "8+6=14,14+2=16,16+9=26#"),
          ("<3+8+1+5>", "3+8=11,11+1=12,12+5=17#", "3+8=11,11+1=12,12+5=16#"),
          ("<8+1+5+2>", "8+1=9,9+5=14,14+2=16#", "8+1=9,9+5=14,14+2=15#")]


def probe_rows() -> list[str]:
    from rlpt.search.scorer import load_scorer
    prm, orm = load_scorer(OUT / "prm"), load_scorer(OUT / "orm")
    rows = ["| prompt | right chain: PRM steps · ORM | wrong last sum: PRM steps · ORM |", "|---|---|---|"]
    for p, good, bad in PROBES:
        cells = []
        for t in (good, bad):
            s, o = prm.score([(p, t)])[0], orm.score([(p, t)])[0]
            cells.append(f"`{t}` {', '.join(f'{x:.2f}' for x in s)} · {o[-1]:.2f}")
        rows.append(f"| `{p}` | " + " | ".join(cells) + " |")
    return rows


KEPT = ("verdict", "3b", "3c")    # blocks of docs/search.md this script does not write: kept as they are on the page


def kept_blocks(text: str) -> dict[str, str]:
    """The page's hand-written blocks, `<!-- keep:NAME -->` ... `<!-- /keep:NAME -->` (markers included): the
    verdict at the top, sections 3b and 3c (bench/search_rank.py's and bench/search_logp.py's numbers), so
    rewriting the study's sections does not delete them. A block missing from the page comes back as an empty
    pair of markers."""
    out = {}
    for name in KEPT:
        start, end = f"<!-- keep:{name} -->", f"<!-- /keep:{name} -->"
        i, j = text.find(start), text.find(end)
        out[name] = text[i:j + len(end)] if 0 <= i < j else f"{start}\n{end}"
    return out


def write_page(mc: dict, search: dict, rl: bool) -> Path:
    prm, orm = read_rows(OUT / "prm"), read_rows(OUT / "orm")
    pf, of = prm[-1], orm[-1]
    vf = {k: read_rows(OUT / k)[-1] for k in VARIANTS}
    sel = search["selection"]
    res = search["results"]
    pol = [r for r in read_rows(OUT / "policy") if "acc/heldout" in r][-1]
    comp = [r for r in read_rows(OUT / "completer") if "acc/heldout" in r][-1]
    g = res["greedy@1"]

    def rate(key: str) -> float:
        return sum(res[key]["correct"]) / len(res[key]["correct"])
    gacc = sum(g["correct"]) / len(g["correct"])

    names = ["majority", "weighted prm", "weighted orm", "best_of_n prm last", "best_of_n prm min",
             "best_of_n prm prod", "best_of_n orm last", "beam prm", "dvts prm"]
    for k in VARIANTS:
        names += [f"weighted {k}", f"best_of_n {k} last", f"best_of_n {k} min"]
    names += [f"beam {BEST}", f"dvts {BEST}", f"weighted {GEN}", f"best_of_n {GEN} last", "pass@n (oracle)"]
    table = ["| strategy | " + " | ".join(f"N={n}: acc [95% CI] · tokens" for n in NS) + " |",
             "|---|" + "---|" * len(NS)]
    gb = boot([g["correct"]])[0]
    table.append(f"| greedy | {ci(gb)} · {sum(g['tokens']) / len(g['tokens']):.0f} |" + " |" * (len(NS) - 1))
    for name in names:
        cells = []
        for n in NS:
            r = res[f"{name}@{n}"]
            cells.append(f"{ci(boot([r['correct']])[0])} · {sum(r['tokens']) / len(r['tokens']):.0f}")
        table.append(f"| {name} | " + " | ".join(cells) + " |")

    diffs = ["| comparison (paired over prompts) | " + " | ".join(f"N={n}" for n in NS) + " |",
             "|---|" + "---|" * len(NS)]
    for label, a, b in (("weighted PRM − majority", "weighted prm", "majority"),
                        ("majority − greedy", "majority", "greedy"),
                        ("best-of-N PRM (last) − best-of-N ORM", "best_of_n prm last", "best_of_n orm last"),
                        ("weighted PRM − weighted ORM", "weighted prm", "weighted orm"),
                        ("beam PRM − weighted PRM", "beam prm", "weighted prm"),
                        ("DVTS PRM − weighted PRM", "dvts prm", "weighted prm"),
                        ("beam PRM − majority", "beam prm", "majority"),
                        (f"weighted `{BEST}` − majority", f"weighted {BEST}", "majority"),
                        (f"best-of-N `{BEST}` − best-of-N PRM (last)", f"best_of_n {BEST} last", "best_of_n prm last"),
                        (f"beam `{BEST}` − beam PRM", f"beam {BEST}", "beam prm"),
                        (f"beam `{BEST}` − majority", f"beam {BEST}", "majority"),
                        (f"weighted `{GEN}` − majority", f"weighted {GEN}", "majority"),
                        (f"best-of-N `{GEN}` − greedy", f"best_of_n {GEN} last", "greedy")):
        diffs.append(f"| {label} | " + " | ".join(
            ci(diff(res, f"{a}@{n}", "greedy@1" if b == "greedy" else f"{b}@{n}"), signed=True) for n in NS) + " |")

    png = DOCS / "search_accuracy_vs_tokens.png"
    with figure(png, size=(7, 4.2)) as ax:
        for name, style in (("majority", "-o"), ("weighted prm", "-s"), ("best_of_n prm last", "-^"),
                            ("best_of_n orm last", "--^"), ("beam prm", "-D"), ("dvts prm", "-v"),
                            (f"best_of_n {BEST} last", "-.^"), (f"weighted {GEN}", "-x"),
                            ("pass@n (oracle)", ":")):
            pts = [res[f"{name}@{n}"] for n in NS]
            bs = boot([p["correct"] for p in pts])
            x = [sum(p["tokens"]) / len(p["tokens"]) for p in pts]
            ax.errorbar(x, [b[0] for b in bs], yerr=[[b[0] - b[1] for b in bs], [b[2] - b[0] for b in bs]],
                        fmt=style, capsize=3, markersize=4, label=name)
        ax.axhline(gacc, color="k", lw=0.8, ls="--", label="greedy")
        ax.set_xscale("log")
        ax.set_xlabel("generated tokens per prompt (N = 4, 16, 64)")
        ax.set_ylabel("accuracy, 95% bootstrap CI")
        ax.set_title(f"search on {len(search['prompts'])} held-out {SLICE}-operand prompts")
        ax.legend(fontsize=7)

    def side(d: tuple[float, float, float]) -> str:
        return "above" if d[1] > 0 else "below" if d[2] < 0 else "tied with"

    def bar(k: str) -> str:
        parts = []
        for n in NS:
            w, m = diff(res, f"weighted {k}@{n}", f"majority@{n}"), diff(res, f"majority@{n}", "greedy@1")
            parts.append(f"N={n}: weighted `{k}` {side(w)} majority, majority {side(m)} greedy")
        ok = all(diff(res, f"weighted {k}@{n}", f"majority@{n}")[2] >= 0 and
                 diff(res, f"majority@{n}", "greedy@1")[2] >= 0 for n in NS)
        return "; ".join(parts) + (" (95 % intervals of the paired differences). " +
                                   ("Met: no comparison is significantly below." if ok else
                                    "**Not met**: a comparison is significantly below where the bar wants ≥."))

    def budget_claim(k: str) -> str:
        gains = {n: diff(res, f"beam {k}@{n}", f"majority@{n}") for n in NS}
        wgain = {n: diff(res, f"weighted {k}@{n}", f"majority@{n}") for n in NS}
        lo, hi = NS[0], NS[-1]
        grows = gains[hi][0] > gains[lo][0] and gains[hi][1] > 0
        return (f"`{k}`: beam + PRM over majority vote: {ci(gains[lo], True)} at N={lo}, "
                f"{ci(gains[hi], True)} at N={hi}; "
                f"weighted best-of-N + PRM over majority: {ci(wgain[lo], True)} at N={lo}, "
                f"{ci(wgain[hi], True)} at N={hi}. "
                + ("**The claim held here**: PRM + beam's gain over majority is larger at the high budget and its "
                   "interval excludes 0." if grows else
                   "**The claim did not hold here**: PRM + beam's gain over majority is not larger at the high "
                   "budget with an interval above 0."))

    rl_part = "Not run (`--skip-rl`)."
    if rl:
        rows_rl = []
        curves, summary = {}, {}
        for arm in ("outcome", "process"):
            finals, starts, reach = [], [], []
            for s in SEEDS:
                rows = read_rows(OUT / f"grpo_{arm}_s{s}")
                acc = series(rows, "acc/heldout_honest") or series(rows, "acc/heldout")
                curves[(arm, s)] = acc
                starts.append(acc[0][1])
                finals.append(acc[-1][1])
                hit = [st for st, a in acc if a >= acc[0][1] + TARGET_GAIN]
                reach.append(hit[0] if hit else None)
                degen = [r["groups/degenerate_frac"] for r in rows if "groups/degenerate_frac" in r]
                rows_rl.append(f"| {arm} | {s} | {f3(acc[0][1])} | {f3(acc[-1][1])} | {f3(max(a for _, a in acc))} | "
                               f"{reach[-1] if reach[-1] is not None else 'not reached'} | "
                               f"{f3(sum(degen) / len(degen) if degen else None)} |")
            degen_all = [r["groups/degenerate_frac"] for s in SEEDS for r in read_rows(OUT / f"grpo_{arm}_s{s}")
                         if "groups/degenerate_frac" in r]
            summary[arm] = (sum(finals) / 3, sum(finals) / 3 - sum(starts) / 3, sum(x is not None for x in reach),
                            sum(degen_all) / len(degen_all), min(finals), max(finals))
            rows_rl.append(f"| **{arm} mean** | | {f3(sum(starts) / 3)} | {f3(sum(finals) / 3)} | | "
                           f"{summary[arm][2]}/3 reached | {f3(summary[arm][3])} |")
        rpng = DOCS / "search_grpo_process.png"
        with figure(rpng, size=(6.5, 3.8)) as ax:
            for (arm, s), acc in curves.items():
                ax.plot([a for a, _ in acc], [b for _, b in acc], "-o" if arm == "process" else "--s", markersize=3,
                        color="C1" if arm == "process" else "C0", label=f"{arm} (seed {s})")
            ax.set_xlabel("GRPO step")
            ax.set_ylabel("held-out greedy accuracy (verifier)")
            ax.legend(fontsize=7)
        o, pr = summary["outcome"], summary["process"]
        verdict = (f"Process reward turned most degenerate groups into useful ones (degenerate fraction "
                   f"{o[3]:.2f} → {pr[3]:.2f}: an all-right or all-wrong group now differs in how sure the PRM is of "
                   f"its steps), but it did not train faster or further: GRPO divides by the group's std, so in an "
                   f"all-right group the PRM's small score differences become full-size advantages, and the policy "
                   f"is pushed by the PRM's noise as hard as by a verdict. Final held-out accuracy "
                   f"{o[0]:.3f} (outcome, seeds {o[4]:.3f}–{o[5]:.3f}) against {pr[0]:.3f} (process, "
                   f"{pr[4]:.3f}–{pr[5]:.3f}); {o[2]}/3 against {pr[2]}/3 seeds reached start + {TARGET_GAIN}. "
                   "The extra signal is the PRM's, and section 2 shows what it knows: early steps well, the last "
                   "sum barely, so it mostly rewards chains that look like the SFT data. On this task the verifier "
                   "is exact and cheap; a dense learned reward adds variance where the outcome is already the truth "
                   "(R1's reason to drop PRMs, lesson 17).")
        rl_part = "\n".join([verdict, "", "| reward | seed | held-out start | final | best | step reaching start + "
                             f"{TARGET_GAIN} | degenerate groups |", "|---|---:|---:|---:|---:|---:|---:|", *rows_rl,
                             "", f"![GRPO with and without process reward]({rpng.name})"])

    def mc_row(label: str, m: dict) -> str:
        return (f"| {label} | {m['auroc']:.3f} | {m['tokens_generated']} | {m['tokens_prefill']} | "
                f"{m['tokens_shared_by_fork']} | {m['seconds']:.1f} |")
    variant_cmds = [f"rlpt prm init_from=runs/policy scorer.data.completer=runs/completer {' '.join(SCORER)} "
                    + " ".join(x.format(completer="runs/completer", out="runs") for x in extra) + f" run.name={k}"
                    for k, (_, extra) in VARIANTS.items()]

    def tail_bce(name: str) -> float:       # the mean of the last 5 logged training losses
        xs = [r["loss/bce"] for r in read_rows(OUT / name) if "loss/bce" in r][-5:]
        return sum(xs) / len(xs)

    def bars(r: dict) -> str:
        h, f = r.get("prm/step_auroc_heldout", 0), r.get("prm/step_auroc_5ops", 0)
        return (f"held-out {f3(h)} {'met' if h >= 0.90 else 'missed'}, "
                f"5 operands {f3(f)} {'met' if f >= 0.85 else 'missed'}")

    def row2(label: str, prm_: str, orm_: str, var: list[str]) -> str:
        return f"| {label} | {prm_} | {orm_} | " + " | ".join(var) + " |"

    def vcol(key: str) -> list[str]:
        return [f3(vf[k].get(key)) for k in VARIANTS]
    base = ("prm", "orm")
    s2 = ["| | PRM | ORM | " + " | ".join(f"`{k}`" for k in VARIANTS) + " |",
          "|---|---:|---:|" + "---:|" * len(VARIANTS),
          row2("step AUROC, held-out prompts (2–4 operands)", f3(pf.get("prm/step_auroc_heldout")), "—",
               vcol("prm/step_auroc_heldout")),
          row2("step AUROC, 5-operand slice (never trained on)", f3(pf.get("prm/step_auroc_5ops")), "—",
               vcol("prm/step_auroc_5ops")),
          row2("outcome AUROC (final score vs verdict), held-out", f3(pf.get("prm/outcome_auroc_heldout")),
               f3(of.get("orm/outcome_auroc_heldout")), vcol("prm/outcome_auroc_heldout")),
          row2("outcome AUROC, 5-operand slice", f3(pf.get("prm/outcome_auroc_5ops")),
               f3(of.get("orm/outcome_auroc_5ops")), vcol("prm/outcome_auroc_5ops")),
          row2("outcome AUROC on the search's candidates, pooled", *(f3(sel[k]["pooled_auroc"]) for k in base),
               [f3(sel[k]["pooled_auroc"]) for k in VARIANTS]),
          row2("the same, **within a prompt** (mean over prompts)", *(f3(sel[k]["within_auroc"]) for k in base),
               [f3(sel[k]["within_auroc"]) for k in VARIANTS]),
          row2("MC label AUROC (training rows / held-out rows)",
               f"{f3(pf.get('labels/mc_auroc_train'))} / {f3(pf.get('labels/mc_auroc_heldout'))}", "—",
               [f"{f3(vf[k].get('labels/mc_auroc_train'))} / {f3(vf[k].get('labels/mc_auroc_heldout'))}"
                for k in VARIANTS])]
    page = DOCS / "search.md"
    keep = kept_blocks(page.read_text() if page.exists() else "")
    text = f"""# ORM, PRM and test-time search on the arithmetic chain of thought (lesson 17)

**Machine.** {machine()}. Accuracies move with the CPU (its kernels change float results): read the
intervals and the differences, not the third digit.

{keep["verdict"]}

```bash
python examples/search_study.py          # every run below, then this page (reuses finished runs)
# by hand, the same jobs:
rlpt sft sft.format=cot sft.steps={POLICY_STEPS} run.name=policy        # the imperfect policy
rlpt sft sft.format=cot sft.steps={COMPLETER_STEPS} run.name=completer     # the strong completer
rlpt prm init_from=runs/policy scorer.data.completer=runs/completer {' '.join(SCORER)}
rlpt orm init_from=runs/policy {' '.join(SCORER)}
{chr(10).join(variant_cmds)}
rlpt search policy=runs/policy scorer=runs/prm task.min_operands=4 task.max_operands=4 search.n=[4,16,64]
rlpt search policy=runs/policy verifier=runs/completer task.min_operands=4 task.max_operands=4 search.n=[4,16,64] \\
  search.strategies=[greedy,majority,best_of_n,weighted_best_of_n]   # the generative verifier (the ceiling row below)
rlpt train env.name=prm env.model_path=runs/prm init_from=runs/policy algorithm.name=grpo
# section 3b (issue 17's bar rerun): the temperature chosen on a dev split, the PRMs searched at it
python bench/search_rank.py --rank-coef 1.0 --dev-prompts 300 --step-prompts 300,300,100
python bench/search_rank.py --report-only        # its tables again, from runs/search_study/search_rank.json
python bench/search_rank.py --step-positions     # why the step-AUROC bars are missed: AUROC per step position
rlpt prm init_from=runs/policy trunk=runs/completer scorer.data.file=runs/prm_strong/steps.jsonl \\
  scorer.data.heldout_file=runs/prm_strong/steps_heldout.jsonl {' '.join(SCORER)} scorer.rank_coef=1.0 \\
  run.name=prm_strong_rank
rlpt search policy=runs/policy scorer=runs/prm_strong_rank task.min_operands=4 task.max_operands=4 \\
  search.n=[4,16,64] search.temperature=0.5
# section 3c: PRMs that read their trunk's own log-probs (and a second, operand-counting model's)
python bench/search_logp.py --dev-prompts 300    # prm_logp, completer_mix, prm_logp_aux, the bar; tables of 3c
python bench/search_logp.py --diagnose           # why the 5-operand chains are malformed
python bench/search_logp.py --report-only        # the tables again, from runs/search_study/search_logp.json
rlpt prm init_from=runs/policy scorer.data.completer=runs/completer {' '.join(SCORER)} trunk=runs/completer \\
  scorer.logp_feature=true run.name=prm_logp
rlpt sft sft.format=cot sft.steps=300 task.max_value=99 init_from=runs/completer run.name=completer_mix
rlpt prm init_from=runs/policy scorer.data.completer=runs/completer {' '.join(SCORER)} trunk=runs/completer \\
  scorer.logp_feature=true scorer.logp_aux=runs/completer_mix scorer.data.file=runs/prm_logp/steps.jsonl \\
  scorer.data.heldout_file=runs/prm_logp/steps_heldout.jsonl run.name=prm_logp_aux
# section 3d: the completer trained with model.rope_theta=1e30 (≈ no RoPE) as prm_logp's trunk
rlpt sft sft.format=cot sft.steps=600 model.rope_theta=1e30 run.name=completer_nope
python bench/search_logp.py --diagnose --models completer_nope,completer
rlpt prm init_from=runs/policy scorer.data.completer=runs/completer {' '.join(SCORER)} trunk=runs/completer_nope \\
  scorer.logp_feature=true scorer.data.file=runs/prm_logp/steps.jsonl \\
  scorer.data.heldout_file=runs/prm_logp/steps_heldout.jsonl run.name=prm_logp_nope
```

Where the code is (`rlpt/search/`, floor 4): `steps.py` (split at `,` and the final `#`, delimiter positions,
exact step truth), `labels.py` (Monte-Carlo labels, TRL stepwise JSONL: take them to TRL's `PRMTrainer` with
`step_separator=""`, the delimiters are already in the steps), `scorer.py` (the ORM / PRM: SFT trunk + scalar
head, BCE read only at the delimiters; `scorer.logp_feature` adds the trunk's own step log-probs to the head and
`scorer.logp_aux` a second model's: section 3c), `strategies.py` (greedy, majority, best-of-N with last / min / prod,
weighted best-of-N, step-level beam, DVTS; each returns the tokens it generated), `jobs.py` and `cli.py`
(`rlpt prm`, `rlpt orm`, `rlpt search`); the RL hook is `rlpt/envs/prm.py` (PPO reads its per-step terms from
`info["step_rewards"]`, GRPO its scalar reward). MCTS is left out: on chains of 3–4 steps a PRM-guided tree
has little to search that DVTS does not, and the lesson calls it "mostly a research artifact".

The task has what no anchor's task has: **exact step truth**. In `3+4=7,7+5=12#` step k is right iff it
adds operand k+1 to the previous result and the sum is right; a prefix is right iff all its steps are
(`rlpt/search/steps.py`). So label noise, PRM quality and search gains are measured, not guessed.

Policy: CoT SFT for {POLICY_STEPS} steps, held-out greedy accuracy {f3(pol['acc/heldout'])} on 2–4 operands,
{f3(gacc)} on the searched slice ({len(search['prompts'])} held-out {SLICE}-operand prompts).
Completer for the Monte-Carlo labels: the same recipe for {COMPLETER_STEPS} steps ({f3(comp['acc/heldout'])}).

## 1. Monte-Carlo labels against exact step truth (N = 8)

{mc['policy']['prefixes']} intermediate step prefixes of 512 held-out responses sampled from the policy at
temperature 1 ({mc['policy']['wrong_prefixes']} of them wrong); 8 continuations each at temperature 1.

| completer | AUROC of p̂ against truth | generated tokens | prefilled | shared by fork | seconds |
|---|---:|---:|---:|---:|---:|
{mc_row('the policy itself', mc['policy'])}
{mc_row(f'strong completer ({COMPLETER_STEPS} SFT steps)', mc['completer'])}

Each prefix is one engine request with n = 8: prefilled once, the other 7 samples fork its KV blocks
("shared by fork" counts the prompt tokens they did not recompute). MC labels are the *completer's*
success rates (Math-Shepherd's caveat): the imperfect policy as its own completer fails from right prefixes
often enough, and repairs wrong prefixes (a chain that writes `6+7=14` and still ends on the right sum)
often enough, that its labels miss the 0.95 AUROC bar; a strong completer clears it. The PRM below is
trained on the strong completer's labels of the policy's own responses.

## 2. The PRM and the ORM

Both: the policy's SFT trunk plus a scalar head, BCE, {pf.get('rows/train', 0):.0f} training responses
(one per prompt, temperature 1). PRM: soft MC labels at every step delimiter; ORM: the verdict at the last token.
Then one lever at a time on the PRM (section 2b says why): {'; '.join(f'`{k}`: {d}' for k, (d, _) in VARIANTS.items())}.
Same batch and learning rate, 600 steps unless named;
{', '.join(f'`{k}`: {vf[k].get("rows/train", 0):.0f}' for k in VARIANTS)}
training responses. The bars of the issue: step AUROC ≥ 0.90 held-out and ≥ 0.85 on 5 operands.
{'; '.join(f"`{k}`: {bars(r)}" for k, r in (("prm", pf), *vf.items()))}.

{chr(10).join(s2)}

(The 5-operand outcome AUROC is "—"/nan where the policy gets no 5-operand problem right: one class is empty.)

Which lever helped. The completer as trunk (`prm_ctrunk`, same rows) is the one accepted: it meets both step
AUROC bars and raises the within-prompt ranking from {f3(sel['prm']['within_auroc'])} to
{f3(sel['prm_ctrunk']['within_auroc'])} (best-of-N: section 3). Sampling the training responses as search does
with the same 4096 rows (`prm_1kx4`: 1024 prompts × 4) overfits the fewer prompts (final training BCE
{f3(tail_bce('prm_1kx4'))} against {f3(vf['prm_1kx4'].get('loss/bce_heldout'))} held-out; `prm_ctrunk`
{f3(tail_bce('prm_ctrunk'))} / {f3(vf['prm_ctrunk'].get('loss/bce_heldout'))}) and is worse everywhere.
Twice the steps (`prm_ctrunk_1200`): step AUROC {f3(vf['prm_ctrunk_1200'].get('prm/step_auroc_heldout'))} /
{f3(vf['prm_ctrunk_1200'].get('prm/step_auroc_5ops'))}, within-prompt {f3(sel['prm_ctrunk_1200']['within_auroc'])},
best-of-N at N={NS[-1]} {f3(rate(f'best_of_n prm_ctrunk_1200 last@{NS[-1]}'))} against
{f3(rate(f'best_of_n prm_ctrunk last@{NS[-1]}'))}: the held-out AUROC rises, the 5-operand one falls below its
bar (it fits the 2–4 operand chains tighter and generalises less), the ranking within a prompt barely moves; not
accepted. Four
times the rows (`prm_strong`) raises the held-out step and outcome AUROCs but not the 5-operand one nor the
within-prompt ranking ({f3(sel['prm_strong']['within_auroc'])}); plain best-of-N does not move, and it misses
the 5-operand bar, so it is not the PRM beam and DVTS run with below. It does help weighted voting (weighted
best-of-N at N={NS[-1]}: {f3(rate(f'weighted prm_strong@{NS[-1]}'))}, over majority
{ci(diff(res, f'weighted prm_strong@{NS[-1]}', f'majority@{NS[-1]}'), True)}, over weighted `prm_ctrunk`
{ci(diff(res, f'weighted prm_strong@{NS[-1]}', f'weighted prm_ctrunk@{NS[-1]}'), True)}).

## 2b. Why best-of-N fell below a random candidate: not a bug, the scorer ranks at chance within a prompt

Best-of-N with the first PRM fell from {f3(rate('best_of_n prm last@4'))} (N=4) to {f3(rate('best_of_n prm last@64'))}
(N=64), below greedy and below a random candidate, while pass@64 is {f3(rate('pass@n (oracle)@64'))}. Checked on
the search's own 64 candidates per prompt (section 3's samples, temperature {TEMP}):

* A random candidate is right {f3(sel['random']['acc'])} of the time; {sel['random']['complete']:.1%} of the
  candidates end their turn with `#`. The first PRM's pick at N=64 is complete {sel['prm']['pick64_complete']:.0%}
  of the time and as long as the rest ({sel['prm']['pick64_len']:.1f} characters against {sel['random']['len']:.1f}):
  no truncation, no length effect, no partial response scored at an earlier delimiter.
* A candidate's score does not depend on the other candidates in its batch: the batch is right-padded and the
  trunk causal, so padding never reaches a read position (`tests/test_search.py::test_a_score_does_not_depend_on_
  the_other_candidates_in_its_batch`; on the real PRM, one candidate alone against inside its batch: 2e-7).
* The selection code is the one the oracle scorer runs through to give pass@N; it takes the argmax (first of
  equal scores), and identical texts get identical scores, so ties cannot favour a wrong chain.
* **The scorer.** Pooled over prompts, the first PRM's final score separates right from wrong candidates with
  AUROC {f3(sel['prm']['pooled_auroc'])} (the ORM {f3(sel['orm']['pooled_auroc'])}); **within one prompt**, the
  only ranking best-of-N does, {f3(sel['prm']['within_auroc'])} (ORM {f3(sel['orm']['within_auroc'])}): chance.
  The pooled number rewards knowing which prompts are hard, not which answer is right. And the argmax over 64
  near-chance scores lands on the rare chains: the chosen text is on average {sel['prm']['pick64_share']:.1%} of its
  prompt's samples, a sample's own text {sel['random']['share']:.1%} (the policy's most common chain, right more
  often than not, sits in the middle of the score range; the high tail is the scorer's error on chains it rarely
  saw). Best-of-N below random is what a proxy with chance ranking and a heavy tail does under max.

## 3. Search at equal generated tokens

The best-of-N family uses the same 64 samples per prompt (temperature {TEMP}; the first N at budget N), so at
a given N they spend exactly the same tokens and their differences are paired. Beam (width {WIDTH}, n
step-samples per iteration) and DVTS (n/{WIDTH} subtrees, {WIDTH} expansions each) spend what the table says.
Intervals: 95 % bootstrap over prompts.

{chr(10).join(table)}

![accuracy against generated tokens]({png.name})

Paired differences (mean [95 % CI]):

{chr(10).join(diffs)}

**The issue's bar** (weighted best-of-N with the PRM ≥ majority ≥ greedy at equal tokens). With the
first PRM: {bar('prm')} With `{BEST}`: {bar(BEST)} With the generative verifier `{GEN}` (section 3's
ceilings): {bar(GEN)} Majority below greedy at N=4 is the sampling temperature's cost, not the scorer's.

**The course's claim** (PRM + beam adds most at high budget). {budget_claim('prm')} {budget_claim(BEST)}

**Why.** Section 2b: the candidates hold the answer (pass@N climbs to {f3(rate(f"pass@n (oracle)@{NS[-1]}"))} at
N={NS[-1]}) but a learned verifier that ranks a prompt's candidates near chance (within-prompt outcome AUROC
{f3(sel['prm']['within_auroc'])} for the first PRM, {f3(sel[BEST]['within_auroc'])} for `{BEST}`) turns a
larger N into a larger chance of picking a confidently scored wrong chain: best-of-N, beam and DVTS get *worse*
as N grows (reward over-optimisation against a proxy, lesson 15's curve at test time), while majority and weighted
voting, which lean on agreement between samples, stay near greedy. Beam and DVTS rank by the last delimiter's
score at every iteration, so the same weak score decides their picks. Sampling at temperature {TEMP} also costs:
majority at N=4 is below greedy. The step AUROC bars (which pool steps *across* prompts) can be met while the
selection still fails: they reward knowing which prompts and which steps are hard, not which sum is right.
Four chains from the searched prompts, right and with a wrong last sum, under the first PRM and the ORM:

{chr(10).join(probe_rows())}

**Ceilings, and what would reach them.** The oracle scorer (the task's verifier) through the same selection
code gives pass@N: {f3(rate('pass@n (oracle)@4'))} / {f3(rate('pass@n (oracle)@16'))} /
{f3(rate(f'pass@n (oracle)@{NS[-1]}'))} at N = 4 / 16 / 64. The strong completer, which the labels and the
`{BEST}` trunk come from (a far stronger model than the searched policy), answers the searched slice
greedily with accuracy {f3(rate('completer greedy@1'))}: a verifier that adds as well as it does exists in
these weights, but BCE on 4096–16384 responses teaches the head little of it (within-prompt AUROC
{f3(sel[BEST]['within_auroc'])}). Read as a generative verifier instead
(`LogProbScorer`: the completer's probability of each candidate, no training), the same weights rank a prompt's
candidates with within-prompt AUROC {f3(sel[GEN]['within_auroc'])}, and best-of-N with it gives
{f3(rate(f'best_of_n {GEN} last@4'))} / {f3(rate(f'best_of_n {GEN} last@16'))} /
{f3(rate(f'best_of_n {GEN} last@{NS[-1]}'))} at N = 4 / 16 / 64 (rows `{GEN}` above): the selection works once
the scorer can rank. What would bring a *trained* PRM there: a signal about *this* prompt's answer instead of
pooled BCE (pairs of right and wrong chains for the same prompt under a ranking loss, lesson 16's Bradley–Terry
reward model; many more responses per prompt), or keeping the completer's language-model head as the verifier
(the generative verifier above, fine-tuned on the MC labels).

{keep["3b"]}

{keep["3c"]}

## 4. Process rewards in GRPO

From the policy, 3 seeds each: GRPO with the verifier's outcome only (`env.name=arithmetic`) against outcome
plus the PRM's process term (`env.name=prm`: R = 1[correct] − 0.5 · mean_k(1 − s_k)). {RL[0]},
{RL[1].split('=')[1]} prompts × {RL[2].split('=')[1]} samples, held-out greedy accuracy by the verifier every 5
steps on 300 held-out prompts (2–4 operands).

{rl_part}
"""
    page.write_text(text)
    return page


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    report_only, skip_rl = "--report-only" in argv, "--skip-rl" in argv
    OUT.mkdir(parents=True, exist_ok=True)
    paths = {k: OUT / f"{k}.json" for k in ("mc", "search")}
    if not report_only:
        policy, completer = sft("policy", POLICY_STEPS), sft("completer", COMPLETER_STEPS)
        prm, orm = scorer("prm", policy, completer), scorer("orm", policy, completer)
        for name, (_, extra) in VARIANTS.items():
            scorer("prm", policy, completer, name, extra)
        if not paths["mc"].exists():
            paths["mc"].write_text(json.dumps(mc_study(policy, completer)))
        done = json.loads(paths["search"].read_text()) if paths["search"].exists() else {}
        paths["search"].write_text(json.dumps(search_study(policy, completer, done)))
        if not skip_rl:
            rl_study(policy, OUT / "prm")
        del prm, orm
    rl = not skip_rl and (OUT / f"grpo_process_s{SEEDS[-1]}" / "metrics.jsonl").exists()
    page = write_page(json.loads(paths["mc"].read_text()), json.loads(paths["search"].read_text()), rl)
    print(f"[search_study] wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
