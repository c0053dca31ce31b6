"""Lesson 17 on the arithmetic chain-of-thought task, where every step's truth is known exactly.

    python examples/search_study.py [--report-only] [--skip-rl]       -> docs/search.md, docs/search_*.png

Runs under runs/search_study/ (each reused when finished, continued when interrupted):
  policy/     rlpt sft sft.format=cot sft.steps=200        the imperfect CoT policy searched over
  completer/  rlpt sft sft.format=cot sft.steps=600        a strong completer for the Monte-Carlo labels
  prm/        rlpt prm init_from=policy scorer.data.completer=completer
  orm/        rlpt orm init_from=policy                     (same prompts, the verdict as the only label)
  mc.json     MC label AUROC against exact step truth at N = 8, per completer
  search.json strategies × N ∈ {4, 16, 64} on held-out 4-operand prompts, tokens spent, per-prompt outcomes
  grpo_{outcome,process}_s{0,1,2}/   rlpt train from the policy: env arithmetic vs env prm (3 seeds)

The page reads every number from these files; nothing is typed in by hand.
"""
from __future__ import annotations

import json
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


def sft(name: str, steps: int) -> Path:
    from rlpt.sft import SFTJob, train_sft
    job = load_config(SFTJob, None, ["sft.format=cot", f"sft.steps={steps}", "eval.size=200", f"eval.every={steps}",
                                     f"run.out_dir={OUT}", f"run.name={name}", "run.threads=1", "run.progress=false"])
    return run_stage(name, OUT / name, steps, lambda resume: train_sft(job, resume=resume))


def scorer(kind: str, policy: Path, completer: Path) -> Path:
    from rlpt.search.jobs import ScorerJob, train_scorer
    over = [f"init_from={policy}", f"scorer.kind={kind}", *SCORER, f"run.out_dir={OUT}", f"run.name={kind}",
            "run.threads=1", "run.progress=false"]
    if kind == "prm":
        over.append(f"scorer.data.completer={completer}")
    job = load_config(ScorerJob, None, over)
    return run_stage(kind, OUT / kind, job.scorer.steps, lambda resume: train_scorer(job, resume=resume))


def mc_study(policy: Path, completer: Path) -> dict:
    """AUROC of MC soft labels (N = 8) against exact truth, with the policy itself and the strong completer
    as completers, on the same 512 sampled responses; and what the engine shared."""
    from rlpt.engine import LLM
    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.task import ArithmeticTask
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.search.jobs import _problems
    from rlpt.search.labels import label_auroc, mc_labels, sample_responses
    tok = CharTokenizer()
    pol = LLM(load_model(policy), tok)
    problems = _problems(ArithmeticTask(), 7, 512, "heldout")
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


def search_study(policy: Path, prm: Path, orm: Path, done: dict) -> dict:
    """Every strategy on the same held-out 4-operand prompts. The best-of-N family shares one set of 64
    samples per prompt (the first N are used at budget N), so their comparisons are paired. Results already
    in `done` (a previous search.json) are kept: delete a key to recompute it."""
    from rlpt.engine import LLM
    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.task import ArithmeticTask
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.search.scorer import OracleScorer, load_scorer
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
    scorers = {"prm": load_scorer(prm, tok), "orm": load_scorer(orm, tok)}
    prompts = [p.prompt for p in ArithmeticTask(min_operands=SLICE, max_operands=SLICE).heldout_set(PROMPTS)]
    res: dict[str, dict] = dict(done.get("results", {}))
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
    if any(f"majority@{n}" not in res for n in NS):      # the best-of-N family, from one set of samples
        t0 = time.perf_counter()
        samples = sample(llm, prompts, max(NS), TEMP, 40, seed=0)
        t_sample = time.perf_counter() - t0
        scores = {k: score_samples(s, samples) for k, s in scorers.items()}
        oracle = score_samples(OracleScorer(), samples)
    for n in NS:
        if f"beam prm@{n}" not in res:
            t0 = time.perf_counter()
            keep("beam prm", n, beam_search(llm, scorers["prm"], prompts, n, min(WIDTH, n), TEMP, seed=1),
                 time.perf_counter() - t0)
        if f"dvts prm@{n}" not in res:
            t0 = time.perf_counter()
            keep("dvts prm", n, dvts(llm, scorers["prm"], prompts, n, max(1, n // WIDTH), TEMP, seed=2),
                 time.perf_counter() - t0)
        if f"majority@{n}" in res:
            continue
        sub = [s.first(n) for s in samples]
        keep("majority", n, [pick_majority(s) for s in sub], t_sample)
        keep("pass@n (oracle)", n, [pick_best(s, o[:n]) for s, o in zip(sub, oracle)], t_sample)
        for k in scorers:
            for agg in ("last", "min", "prod"):
                keep(f"best_of_n {k} {agg}", n, [pick_best(s, sc[:n], agg) for s, sc in zip(sub, scores[k])], t_sample)
            keep(f"weighted {k}", n, [pick_weighted(s, sc[:n], "last") for s, sc in zip(sub, scores[k])], t_sample)
    return {"prompts": prompts, "results": res}


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


def write_page(mc: dict, search: dict, rl: bool) -> Path:
    prm, orm = read_rows(OUT / "prm"), read_rows(OUT / "orm")
    pf, of = prm[-1], orm[-1]
    res = search["results"]
    pol = [r for r in read_rows(OUT / "policy") if "acc/heldout" in r][-1]
    comp = [r for r in read_rows(OUT / "completer") if "acc/heldout" in r][-1]
    g = res["greedy@1"]
    gacc = sum(g["correct"]) / len(g["correct"])

    names = ["majority", "weighted prm", "weighted orm", "best_of_n prm last", "best_of_n prm min",
             "best_of_n prm prod", "best_of_n orm last", "beam prm", "dvts prm", "pass@n (oracle)"]
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
                        ("beam PRM − majority", "beam prm", "majority")):
        diffs.append(f"| {label} | " + " | ".join(
            ci(diff(res, f"{a}@{n}", "greedy@1" if b == "greedy" else f"{b}@{n}"), signed=True) for n in NS) + " |")

    png = DOCS / "search_accuracy_vs_tokens.png"
    with figure(png, size=(7, 4.2)) as ax:
        for name, style in (("majority", "-o"), ("weighted prm", "-s"), ("best_of_n prm last", "-^"),
                            ("best_of_n orm last", "--^"), ("beam prm", "-D"), ("dvts prm", "-v"),
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

    def bar() -> str:
        parts = []
        for n in NS:
            w, m = diff(res, f"weighted prm@{n}", f"majority@{n}"), diff(res, f"majority@{n}", "greedy@1")
            parts.append(f"N={n}: weighted PRM {side(w)} majority, majority {side(m)} greedy")
        ok = all(diff(res, f"weighted prm@{n}", f"majority@{n}")[2] >= 0 and
                 diff(res, f"majority@{n}", "greedy@1")[2] >= 0 for n in NS)
        return "; ".join(parts) + (" (95 % intervals of the paired differences). " +
                                   ("Met: no comparison is significantly below." if ok else
                                    "**Not met**: a comparison is significantly below where the bar wants ≥."))

    def budget_claim() -> str:
        gains = {n: diff(res, f"beam prm@{n}", f"majority@{n}") for n in NS}
        wgain = {n: diff(res, f"weighted prm@{n}", f"majority@{n}") for n in NS}
        lo, hi = NS[0], NS[-1]
        grows = gains[hi][0] > gains[lo][0] and gains[hi][1] > 0
        return (f"Beam + PRM over majority vote: {ci(gains[lo], True)} at N={lo}, {ci(gains[hi], True)} at N={hi}; "
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
    o_held, mc_tr = f3(of.get('orm/outcome_auroc_heldout')), f3(pf.get('labels/mc_auroc_train'))
    text = f"""# ORM, PRM and test-time search on the arithmetic chain of thought (lesson 17)

**Machine.** {machine()}. Accuracies move with the CPU (its kernels change float results): read the
intervals and the differences, not the third digit.

```bash
python examples/search_study.py          # every run below, then this page (reuses finished runs)
# by hand, the same jobs:
rlpt sft sft.format=cot sft.steps={POLICY_STEPS} run.name=policy        # the imperfect policy
rlpt sft sft.format=cot sft.steps={COMPLETER_STEPS} run.name=completer     # the strong completer
rlpt prm init_from=runs/policy scorer.data.completer=runs/completer {' '.join(SCORER)}
rlpt orm init_from=runs/policy {' '.join(SCORER)}
rlpt search policy=runs/policy scorer=runs/prm task.min_operands=4 task.max_operands=4 search.n=[4,16,64]
rlpt train env.name=prm env.model_path=runs/prm init_from=runs/policy algorithm.name=grpo
```

Where the code is (`rlpt/search/`, floor 4): `steps.py` (split at `,` and the final `#`, delimiter positions,
exact step truth), `labels.py` (Monte-Carlo labels, TRL stepwise JSONL: take them to TRL's `PRMTrainer` with
`step_separator=""`, the delimiters are already in the steps), `scorer.py` (the ORM / PRM: SFT trunk + scalar
head, BCE read only at the delimiters), `strategies.py` (greedy, majority, best-of-N with last / min / prod,
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

| | PRM | ORM |
|---|---:|---:|
| step AUROC, held-out prompts (2–4 operands) | {f3(pf.get('prm/step_auroc_heldout'))} | — |
| step AUROC, 5-operand slice (never trained on) | {f3(pf.get('prm/step_auroc_5ops'))} | — |
| outcome AUROC (final score vs verdict), held-out | {f3(pf.get('prm/outcome_auroc_heldout'))} | {o_held} |
| outcome AUROC, 5-operand slice | {f3(pf.get('prm/outcome_auroc_5ops'))} | {f3(of.get('orm/outcome_auroc_5ops'))} |
| MC label AUROC (training rows / held-out rows) | {mc_tr} / {f3(pf.get('labels/mc_auroc_heldout'))} | — |

(The 5-operand outcome AUROC is "—"/nan where the policy gets no 5-operand problem right: one class is empty.)

## 3. Search at equal generated tokens

The best-of-N family uses the same 64 samples per prompt (temperature {TEMP}; the first N at budget N), so at
a given N they spend exactly the same tokens and their differences are paired. Beam (width {WIDTH}, n
step-samples per iteration) and DVTS (n/{WIDTH} subtrees, {WIDTH} expansions each) spend what the table says.
Intervals: 95 % bootstrap over prompts.

{chr(10).join(table)}

![accuracy against generated tokens]({png.name})

Paired differences (mean [95 % CI]):

{chr(10).join(diffs)}

**The issue's bar** (weighted best-of-N with the PRM ≥ majority ≥ greedy at equal tokens): {bar()}

**The course's claim** (PRM + beam adds most at high budget). {budget_claim()}

**Why.** The candidates hold the answer (pass@N, the oracle row, climbs to {f3(res[f"pass@n (oracle)@{NS[-1]}"]
['correct'].count(1) / len(search['prompts']))} at N={NS[-1]}), but the learned verifiers cannot tell a right last
sum from a wrong one: outcome AUROC {f3(pf.get('prm/outcome_auroc_heldout'))} (PRM) and
{f3(of.get('orm/outcome_auroc_heldout'))} (ORM) on held-out responses. The PRM's step AUROC
({f3(pf.get('prm/step_auroc_heldout'))}) pools every step; the last-step score, the one the selection reads,
separates right from wrong final sums far less. Four chains from the searched prompts, right and with a wrong
last sum:

{chr(10).join(probe_rows())}

So the argmax over more candidates picks more confidently scored wrong chains: best-of-N, beam and DVTS get
*worse* as N grows (reward over-optimisation against a proxy verifier, lesson 15's curve at test time), while
majority and weighted voting, which lean on agreement between samples, stay near greedy. Beam and DVTS rank by
the last step's score at every iteration, so the weak last-step score decides their final pick too. Sampling at
temperature {TEMP} also costs: majority at N=4 is below greedy. PRM and ORM are indistinguishable here (their
paired differences straddle 0): both are the same trunk failing at the same last addition. What would change it:
a verifier that checks the last sum (the task's own verifier gives the oracle row), or a stronger PRM trunk and
more data (the step AUROC was still rising at 600 steps; 1024 responses gave 0.81).

## 4. Process rewards in GRPO

From the policy, 3 seeds each: GRPO with the verifier's outcome only (`env.name=arithmetic`) against outcome
plus the PRM's process term (`env.name=prm`: R = 1[correct] − 0.5 · mean_k(1 − s_k)). {RL[0]},
{RL[1].split('=')[1]} prompts × {RL[2].split('=')[1]} samples, held-out greedy accuracy by the verifier every 5
steps on 300 held-out prompts (2–4 operands).

{rl_part}
"""
    page = DOCS / "search.md"
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
        if not paths["mc"].exists():
            paths["mc"].write_text(json.dumps(mc_study(policy, completer)))
        done = json.loads(paths["search"].read_text()) if paths["search"].exists() else {}
        paths["search"].write_text(json.dumps(search_study(policy, OUT / "prm", OUT / "orm", done)))
        if not skip_rl:
            rl_study(policy, OUT / "prm")
        del prm, orm
    rl = not skip_rl and (OUT / f"grpo_process_s{SEEDS[-1]}" / "metrics.jsonl").exists()
    page = write_page(json.loads(paths["mc"].read_text()), json.loads(paths["search"].read_text()), rl)
    print(f"[search_study] wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
