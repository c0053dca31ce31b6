"""Issue 17's search bar rerun with the two fixes docs/search.md pointed at (lesson 17).

    weighted best-of-N with the PRM  >=  majority vote  >=  greedy, at equal generated tokens, N in {4, 16, 64}

The study (examples/search_study.py) missed it for two measured reasons: majority@4 fell below greedy because
the search sampled at temperature 0.8, and the learned PRM ranked a prompt's own candidates near chance
(within-prompt outcome AUROC 0.54-0.61) though it pooled well across prompts. This script changes one thing
for each, and measures:

  1. The sampling temperature (`rlpt search search.temperature=...`) is chosen on a DEV split: held-out
     4-operand prompts disjoint from the test slice (heldout_set(2P)[P:], the test slice is heldout_set(P)).
     Rule, fixed before the test slice is searched: the temperature whose worst margin of the bar on dev,
         min over N of  min(weighted_rank@N − majority@N,  majority@N − greedy)
     is largest. The test slice is then searched once, at that temperature.
  2. The PRM: `prm_strong` (the study's variant: completer trunk, 4096 prompts x 4 responses at 0.8, BCE)
     against `prm_strong_rank`: the same labelled rows, BCE + scorer.rank_coef x the within-prompt pairwise
     logistic loss on the final scores (rlpt.search.scorer.rank_loss), batches drawn by whole prompts.

  3. One PRM for both bars (docs/search.md section 3b part 4): the study's `prm_ctrunk` (completer trunk,
     4096 prompts x 1 response at T = 1, BCE; it met the step-AUROC bars on earlier weights) and
     `prm_ctrunk_rank` (2048 prompts x 2 responses at T = 1, BCE + the ranking loss) are trained and searched
     on the test slice at the chosen T, on the same 64 samples per prompt (redrawn; majority checked identical).
     `--step-positions` prints each PRM's step AUROC per step position beside the generative verifier's.

    python bench/search_rank.py [--rank-coef 1.0] [--temps 0.5,0.7,1.0] [--step-prompts 300,300,300]
                                [--dev-prompts 300]
      -> runs/search_study/search_rank.json (per-prompt outcomes; reused when rerun) and the tables of
         docs/search.md section 3b on stdout

The runs live in runs/search_study/ next to the study's (policy, completer and prm_strong are its stages,
reused when finished). Every number is read from the JSON; `--report-only` prints the tables again.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import search_study as S  # noqa: E402 - the study's stages and bootstrap, one definition
from common import f3, read_rows  # noqa: E402

NS = S.NS
OUT = S.OUT
BCE, RANK = "prm_strong", "prm_strong_rank"
CTRUNK = "prm_ctrunk"      # the study's variant that met the step-AUROC bars: completer trunk, 4096 x 1 response, BCE
CTRUNK_RANK = "prm_ctrunk_rank"   # its data as close as pairs allow (2048 prompts x 2 responses at T = 1) + rank loss
EXTRA = (CTRUNK, CTRUNK_RANK)      # searched on the test slice only, at the chosen temperature, on the same samples


def build(rank_coef: float) -> tuple[Path, Path]:
    """The study's policy, completer and PRMs (each reused when finished), and the two PRMs of part 4."""
    policy, completer = S.sft("policy", S.POLICY_STEPS), S.sft("completer", S.COMPLETER_STEPS)
    S.scorer("prm", policy, completer, BCE, S.VARIANTS[BCE][1])
    S.scorer("prm", policy, completer, RANK,
             ["trunk={completer}", f"scorer.data.file={OUT / BCE / 'steps.jsonl'}",
              f"scorer.data.heldout_file={OUT / BCE / 'steps_heldout.jsonl'}", f"scorer.rank_coef={rank_coef}"])
    S.scorer("prm", policy, completer, CTRUNK, S.VARIANTS[CTRUNK][1])
    S.scorer("prm", policy, completer, CTRUNK_RANK, ["trunk={completer}", "scorer.data.prompts=2048",
                                                     "scorer.data.responses=2", f"scorer.rank_coef={rank_coef}"])
    return policy, completer


def add_scorer(llm, prompts: list[str], temperature: float, name: str, scorer, greedy_res: dict, done: dict) -> None:
    """Put `name`'s rows into `done` (a split's result at `temperature`), on the same 64 samples per prompt:
    sample() is seeded, so the draw is repeated exactly; checked on majority vote, which depends only on it."""
    new = best_of_n_family(llm, prompts, temperature, {name: scorer}, greedy_res)
    for n in NS:
        if new["results"][f"majority@{n}"] != done["results"][f"majority@{n}"]:
            raise SystemExit(f"majority@{n} differs from the stored one: the samples were not redrawn identically "
                             "(another CPU or engine?), so the new scorer's rows would not be paired")
    done["results"] |= {k: v for k, v in new["results"].items() if name in k}
    done["selection"][name] = new["selection"][name]


def best_of_n_family(llm, prompts: list[str], temperature: float, scorers: dict, greedy_res: dict) -> dict:
    """Majority, pass@N and, per scorer, weighted and plain best-of-N on one set of 64 samples per prompt
    (the first N at budget N: paired at equal tokens); how each scorer ranks the candidates."""
    from rlpt.gpt_mini.task import parse_prompt
    from rlpt.search.labels import auroc, within_auroc
    from rlpt.search.scorer import OracleScorer
    from rlpt.search.steps import outcome
    from rlpt.search.strategies import pick_best, pick_majority, pick_weighted, sample, score_samples
    t0 = time.perf_counter()
    samples = sample(llm, prompts, max(NS), temperature, 40, seed=0)
    res = dict(greedy_res)

    def keep(name: str, n: int, results) -> None:
        res[f"{name}@{n}"] = {"correct": [int(r.correct) for r in results], "tokens": [r.tokens for r in results]}

    truth = [[outcome(parse_prompt(s.prompt), t) for t in s.texts] for s in samples]
    oracle = score_samples(OracleScorer(), samples)
    selection = {"random": {"acc": sum(map(sum, truth)) / sum(map(len, truth))}}
    for n in NS:
        sub = [s.first(n) for s in samples]
        keep("majority", n, [pick_majority(s) for s in sub])
        keep("pass@n (oracle)", n, [pick_best(s, o[:n]) for s, o in zip(sub, oracle)])
    for k, sc in scorers.items():
        scores = score_samples(sc, samples)
        finals = [[x[-1] if x else 0.0 for x in per] for per in scores]
        selection[k] = {"pooled_auroc": auroc(sum(finals, []), sum(truth, [])),
                        "within_auroc": within_auroc(finals, truth)}
        for n in NS:
            sub = [s.first(n) for s in samples]
            keep(f"weighted {k}", n, [pick_weighted(s, x[:n], "last") for s, x in zip(sub, scores)])
            keep(f"best_of_n {k} last", n, [pick_best(s, x[:n], "last") for s, x in zip(sub, scores)])
    print(f"[search_rank] best-of-N family at T={temperature} on {len(prompts)} prompts: "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    return {"results": res, "selection": selection}


def step_search(llm, prompts: list[str], n: int, temperature: float, scorer, name: str) -> dict:
    """Beam (width 4) and DVTS (N/4 subtrees of 4 expansions) with `scorer` at budget n, as the study runs them."""
    from rlpt.search.strategies import beam_search, dvts
    t0 = time.perf_counter()
    beam = beam_search(llm, scorer, prompts, n, min(S.WIDTH, n), temperature, seed=1)
    tree = dvts(llm, scorer, prompts, n, max(1, n // S.WIDTH), temperature, seed=2)
    print(f"[search_rank] beam + dvts {name} N={n} on {len(prompts)} prompts: {time.perf_counter() - t0:.0f}s",
          flush=True)
    return {f"{strat} {name}@{n}": {"correct": [int(r.correct) for r in out], "tokens": [r.tokens for r in out]}
            for strat, out in (("beam", beam), ("dvts", tree))}


def margin(res: dict) -> float:
    """The bar's worst margin (point estimates): min over N of min(weighted_rank − majority, majority − greedy)."""
    g = sum(res["greedy@1"]["correct"]) / len(res["greedy@1"]["correct"])
    out = []
    for n in NS:
        w, m = (sum(res[f"{k}@{n}"]["correct"]) / len(res[f"{k}@{n}"]["correct"])
                for k in (f"weighted {RANK}", "majority"))
        out.append(min(w - m, m - g))
    return min(out)


def study(args) -> dict:
    from rlpt.engine import LLM
    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.task import ArithmeticTask
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.search.scorer import LogProbScorer, load_scorer
    from rlpt.search.strategies import greedy
    path = OUT / "search_rank.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    policy, completer = build(args.rank_coef)
    tok = CharTokenizer()
    llm = LLM(load_model(policy), tok, max_num_seqs=256)
    scorers = {k: load_scorer(OUT / k, tok) for k in (BCE, RANK)}
    task = ArithmeticTask(min_operands=S.SLICE, max_operands=S.SLICE)
    both = [p.prompt for p in task.heldout_set(2 * S.PROMPTS)]
    test = [p.prompt for p in task.heldout_set(S.PROMPTS)]
    assert both[:S.PROMPTS] == test, "the test slice must be the first half of heldout_set(2P)"
    dev = both[S.PROMPTS:S.PROMPTS + args.dev_prompts]
    if data.get("prompts", {"dev": dev, "test": test}) != {"dev": dev, "test": test}:
        raise SystemExit(f"{path} was made on other prompts (another --dev-prompts?): delete it to recompute")
    data["prompts"] = {"dev": dev, "test": test}

    def save():
        path.write_text(json.dumps(data))

    for split, prompts in (("dev", dev), ("test", test)):
        data.setdefault(split, {})
        if "greedy" not in data[split]:
            g = greedy(llm, prompts)
            data[split]["greedy"] = {"greedy@1": {"correct": [int(r.correct) for r in g],
                                                  "tokens": [r.tokens for r in g]}}
            save()
    for t in args.temps:                                        # 1. the temperature, on dev only
        if str(t) not in data["dev"]:
            data["dev"][str(t)] = best_of_n_family(llm, dev, t, scorers, data["dev"]["greedy"])
            save()
    chosen = max(args.temps, key=lambda t: margin(data["dev"][str(t)]["results"]))
    data["chosen"] = chosen
    print("[search_rank] dev margins: " + ", ".join(f"T={t}: {margin(data['dev'][str(t)]['results']):+.3f}"
                                                      for t in args.temps) + f" -> T={chosen}", flush=True)
    key = str(chosen)                                           # 2. the test slice, once, at the chosen T
    if key not in data["test"]:
        scorers_gen = {**scorers, S.GEN: LogProbScorer(load_model(completer), tok)}
        data["test"][key] = best_of_n_family(llm, test, chosen, scorers_gen, data["test"]["greedy"])
        save()
    for k in EXTRA:                                             # the step-AUROC PRMs, on the same samples
        if f"weighted {k}@{NS[0]}" not in data["test"][key]["results"]:
            add_scorer(llm, test, chosen, k, load_scorer(OUT / k, tok), data["test"]["greedy"], data["test"][key])
            save()
    for n, count in zip(NS, args.step_prompts):                # beam and DVTS: the first `count` test prompts
        if f"beam {RANK}@{n}" not in data["test"][key]["results"]:
            data["test"][key]["results"] |= step_search(llm, test[:count], n, chosen, scorers[RANK], RANK)
            save()
    return data


def step_positions() -> str:
    """Why the step-AUROC bars are missed: per step position, how many of the evaluation rows' steps are wrong and
    each PRM's AUROC there (the pooled step AUROC mixes positions), on the rows the runs' final metrics use (the
    held-out rows of prm_ctrunk, the 5-operand responses hard_rows draws: same seed, same policy), beside the
    generative verifier (the completer's probability of each step prefix) on the same rows."""
    import random

    from rlpt.engine import LLM
    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.task import ArithmeticTask
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.preference.data import distinct_problems
    from rlpt.search.jobs import outcome_rows
    from rlpt.search.labels import auroc, load_rows, sample_responses
    from rlpt.search.scorer import LogProbScorer, load_scorer
    tok = CharTokenizer()
    llm = LLM(load_model(OUT / "policy"), tok, seed=0)
    probs = distinct_problems(ArithmeticTask(min_operands=5, max_operands=5), random.Random(2), 256, "heldout")
    sets = {"held-out (2-4 operands)": load_rows(OUT / CTRUNK / "steps_heldout.jsonl"),
            "5 operands": outcome_rows(probs, sample_responses(llm, probs, 1.0, 40, 2))}
    scorers = {k: load_scorer(OUT / k, tok) for k in (*EXTRA, BCE, RANK) if (OUT / k / "metrics.jsonl").exists()}
    scorers[S.GEN] = LogProbScorer(load_model(OUT / "completer"), tok)
    lines = ["| rows | steps at position 1 / 2 / 3 (wrong) | scorer | pooled step AUROC "
             "| AUROC at position 1 / 2 / 3 |", "|---|---|---|---:|---|"]
    for name, rows in sets.items():
        counts = " / ".join(f"{sum(len(r.truth) > k for r in rows)} "
                            f"({sum(len(r.truth) > k and not r.truth[k] for r in rows)})" for k in range(3))
        for k, sc in scorers.items():
            scores = sc.score([(r.prompt, r.response) for r in rows])
            pooled = auroc([x for a in scores for x in a], [x for r, a in zip(rows, scores) for x in r.truth[:len(a)]])
            per = []
            for pos in range(3):
                pairs = [(a[pos], r.truth[pos]) for a, r in zip(scores, rows) if len(a) > pos]
                ok = len({t for _, t in pairs}) == 2
                per.append(f3(auroc([a for a, _ in pairs], [t for _, t in pairs])) if ok else "—")
            lines.append(f"| {name} | {counts} | `{k}` | {f3(pooled)} | {' / '.join(per)} |")
    return "\n".join(lines)


# -- the tables ------------------------------------------------------------------------------------------------
def acc_cell(r: dict) -> str:
    return f"{S.ci(S.boot([r['correct']])[0])} · {sum(r['tokens']) / len(r['tokens']):.0f}"


def side(d: tuple[float, float, float]) -> str:
    return "above" if d[1] > 0 else "below" if d[2] < 0 else "tied with"


def report(data: dict) -> str:
    temps = [t for t in data["dev"] if t != "greedy"]
    dg = data["dev"]["greedy"]["greedy@1"]["correct"]
    lines = [f"Dev split ({len(data['prompts']['dev'])} held-out {S.SLICE}-operand prompts, none in the test slice); "
             f"greedy {f3(sum(dg) / len(dg))}. Accuracy at N = " + " / ".join(map(str, NS)) + ":", "",
             f"| T | majority | weighted `{BCE}` | weighted `{RANK}` | within-prompt AUROC `{BCE}` / `{RANK}` "
             "| the bar's worst margin |", "|---:|---|---|---|---|---:|"]
    for t in temps:
        d = data["dev"][t]
        res, sel = d["results"], d["selection"]

        def accs(name: str, res=res) -> str:
            return " / ".join(f3(sum(res[f"{name}@{n}"]["correct"]) / len(res[f"{name}@{n}"]["correct"])) for n in NS)
        lines.append(f"| {t} | {accs('majority')} | {accs(f'weighted {BCE}')} | {accs(f'weighted {RANK}')} | "
                     f"{f3(sel[BCE]['within_auroc'])} / {f3(sel[RANK]['within_auroc'])} | {margin(res):+.3f} |")
    key = str(data["chosen"])
    test = data["test"][key]
    res, sel = test["results"], test["selection"]
    res["greedy@1"] = data["test"]["greedy"]["greedy@1"]
    lines += ["", f"Chosen on dev: **T = {key}**. Test slice ({len(data['prompts']['test'])} prompts) at T = {key}:",
              "", "| strategy | " + " | ".join(f"N={n}: acc [95% CI] · tokens" for n in NS) + " |",
              "|---|" + "---|" * len(NS),
              f"| greedy | {acc_cell(res['greedy@1'])} |" + " |" * (len(NS) - 1)]
    names = ["majority", *(f"weighted {k}" for k in (BCE, RANK, *EXTRA)),
             *(f"best_of_n {k} last" for k in (BCE, RANK, *EXTRA)), f"beam {RANK}", f"dvts {RANK}",
             f"weighted {S.GEN}", "pass@n (oracle)"]
    for name in names:
        if f"{name}@{NS[0]}" in res:
            lines.append(f"| {name} | " + " | ".join(acc_cell(res[f"{name}@{n}"]) if f"{name}@{n}" in res else "—"
                                                     for n in NS) + " |")
    steps_p = {n: len(res[f"beam {RANK}@{n}"]["correct"]) for n in NS if f"beam {RANK}@{n}" in res}
    if steps_p:
        lines += ["", "Beam and DVTS ran on the first " + " / ".join(str(steps_p.get(n, 0)) for n in NS) +
                  f" test prompts at N = {' / '.join(map(str, NS))}; their rows and differences are on those "
                  "prompts (the differences pair them with the same prompts' other results)."]
    lines += ["", "Paired differences (mean [95 % CI], bootstrap over prompts):", "",
              "| comparison | " + " | ".join(f"N={n}" for n in NS) + " |", "|---|" + "---|" * len(NS)]
    comps = [(f"weighted `{RANK}` − majority", f"weighted {RANK}", "majority"),
             ("majority − greedy", "majority", "greedy"),
             (f"weighted `{BCE}` − majority", f"weighted {BCE}", "majority"),
             (f"weighted `{RANK}` − weighted `{BCE}`", f"weighted {RANK}", f"weighted {BCE}"),
             (f"best-of-N `{RANK}` − best-of-N `{BCE}`", f"best_of_n {RANK} last", f"best_of_n {BCE} last"),
             *((f"weighted `{k}` − majority", f"weighted {k}", "majority") for k in EXTRA),
             *((f"weighted `{k}` − weighted `{RANK}`", f"weighted {k}", f"weighted {RANK}") for k in EXTRA),
             *((f"best-of-N `{k}` − best-of-N `{RANK}`", f"best_of_n {k} last", f"best_of_n {RANK} last")
               for k in EXTRA),
             (f"beam `{RANK}` − majority", f"beam {RANK}", "majority"),
             (f"DVTS `{RANK}` − majority", f"dvts {RANK}", "majority"),
             (f"beam `{RANK}` − weighted `{RANK}`", f"beam {RANK}", f"weighted {RANK}")]
    for label, a, b in comps:        # S.diff zips: a beam row on the first k prompts pairs with their results
        cells = [S.ci(S.diff(res, f"{a}@{n}", "greedy@1" if b == "greedy" else f"{b}@{n}"), True)
                 if f"{a}@{n}" in res else "—" for n in NS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Within-prompt outcome AUROC on the test candidates (pooled in brackets): " + ", ".join(
        f"`{k}` {f3(sel[k]['within_auroc'])} ({f3(sel[k]['pooled_auroc'])})" for k in sel if k != "random") + "."]
    for k in (k for k in (BCE, RANK, *EXTRA) if f"weighted {k}@{NS[0]}" in res):
        parts, ok = [], True
        for n in NS:
            w, m = S.diff(res, f"weighted {k}@{n}", f"majority@{n}"), S.diff(res, f"majority@{n}", "greedy@1")
            parts.append(f"N={n}: weighted {side(w)} majority, majority {side(m)} greedy"
                         + (" — **met**" if w[2] >= 0 and m[2] >= 0 else " — **not met**"))
            ok = ok and w[2] >= 0 and m[2] >= 0
        lines.append(f"\nBar with `{k}`: " + "; ".join(parts) + ".")
    if len(steps_p) == len(NS):
        g = {n: S.diff(res, f"beam {RANK}@{n}", f"majority@{n}") for n in NS}
        grows = g[NS[-1]][0] > g[NS[0]][0] and g[NS[-1]][1] > 0
        lines.append(f"\nCourse's claim (beam + PRM gains most at high budget), `{RANK}`: "
                     f"beam − majority {S.ci(g[NS[0]], True)} at N={NS[0]}, {S.ci(g[NS[-1]], True)} at N={NS[-1]}: "
                     + ("held." if grows else "did not hold."))
    for k in (k for k in (BCE, RANK, *EXTRA) if (OUT / k / "metrics.jsonl").exists()):
        rows = read_rows(OUT / k)
        fin = rows[-1]
        lines.append(f"\n`{k}` run: step AUROC held-out {f3(fin.get('prm/step_auroc_heldout'))}, "
                     f"5 operands {f3(fin.get('prm/step_auroc_5ops'))}; outcome AUROC held-out "
                     f"{f3(fin.get('prm/outcome_auroc_heldout'))}; "
                     f"final BCE held-out {f3(fin.get('loss/bce_heldout'))}; "
                     f"seconds {f3(max((r.get('time/elapsed', 0) for r in rows), default=None))}.")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank-coef", type=float, default=1.0)
    ap.add_argument("--temps", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.7, 1.0])
    ap.add_argument("--step-prompts", type=lambda s: [int(x) for x in s.split(",")], default=[S.PROMPTS] * len(NS),
                    help="per N, how many of the test prompts (the first) beam and DVTS run on, e.g. 300,300,100")
    ap.add_argument("--dev-prompts", type=int, default=S.PROMPTS, help="dev prompts the temperature is chosen on")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--step-positions", action="store_true", help="print the per-step-position AUROC table only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.step_positions:
        print(step_positions())
        return 0
    data = json.loads((OUT / "search_rank.json").read_text()) if args.report_only else study(args)
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
