"""Issue 17: one PRM for both bars, the step-AUROC bars and the search bar (lesson 17, docs/search.md 3c).

    step AUROC >= 0.90 on held-out prompts and >= 0.85 on the 5-operand slice, and, at equal generated tokens,
    weighted best-of-N with the PRM  >=  majority vote  >=  greedy at N in {4, 16, 64} (95 % bootstrap intervals)

Section 3b part 4 measured why no BCE PRM met both: its scalar head judges one step at AUROC 0.59-0.77 while
the same trunk's own log-probability of the step separates the held-out steps perfectly. `prm_logp` is the
study's `prm_ctrunk` recipe (the completer as trunk, 4096 prompts x 1 policy response at T = 1, labelled by the
completer, BCE, 600 steps) with one lever: `scorer.logp_feature=true`, the head also reads the trunk's step,
prefix and min token log-probs (rlpt.search.scorer.logp_features) and starts as the generative verifier.

  1. Its step AUROCs (the run's final metrics), per step position beside the generative verifier (the
     completer's prefix probability, the untrained `prm_logp` up to a monotone map: its ceiling at the start).
  2. The 5-operand slice: what the policy writes there (kinds of malformed chains) and each scorer's AUROC
     on each kind's steps.
  Section 3d: `prm_logp_nope`, the same recipe with its trunk `completer_nope` (the completer's SFT with
     model.rope_theta=1e30), in the step tables beside `completer_nope_logprob`.
  3. The search bar as bench/search_rank.py runs it, with `prm_logp`: the temperature chosen on the dev split
     by the same rule (the worst margin of the bar, with weighted `prm_logp`), the test slice searched once.

    python bench/search_logp.py [--temps 0.5,0.7,1.0] [--dev-prompts 300] [--report-only] [--diagnose]
      -> runs/search_study/search_logp.json (per-prompt outcomes; reused when rerun), tables on stdout
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import search_rank as R  # noqa: E402 - the bar's family of selections, one definition
import search_study as S  # noqa: E402
from common import f3, read_rows  # noqa: E402

NS, OUT = S.NS, S.OUT
LOGP = "prm_logp"
AUX = "prm_logp_aux"       # + the frozen log-probs of MIX, a model that counts operands (section 3c)
MIX = "completer_mix"      # the completer tuned 300 steps on 2-4 operands of values 0-99 (prompts as long as 5 x 0-9)
NOPE_C = "completer_nope"  # the completer's recipe with model.rope_theta=1e30 (≈ no RoPE: positions from the mask)
NOPE = "prm_logp_nope"     # prm_logp's rows and recipe, its trunk NOPE_C (section 3d)
PRMS = (LOGP, AUX, NOPE)   # trained and in the step tables
SEARCHED = (LOGP,)         # searched (AUX misses the held-out step bar: section 3c)
PATH = OUT / "search_logp.json"


def mix_sft() -> Path:
    """The completer, fine-tuned on 2-4 operand prompts with values 0-99: a 4-operand prompt of two-digit numbers is
    as long as a 5-operand one of digits, so the prompt's length stops telling how many operands it has."""
    from common import run_stage

    from rlpt.config import load_config
    from rlpt.sft import SFTJob, train_sft
    job = load_config(SFTJob, None, ["sft.format=cot", "sft.steps=300", "eval.size=200", "eval.every=300",
                                     "task.max_value=99", f"init_from={OUT / 'completer'}", f"run.out_dir={OUT}",
                                     f"run.name={MIX}", "run.threads=1", "run.progress=false"])
    return run_stage(MIX, OUT / MIX, 300, lambda resume: train_sft(job, resume=resume))


def nope_sft() -> Path:
    """The completer's recipe (CoT SFT, 600 steps, 2-4 operands of 0-9) with model.rope_theta=1e30: the rotation is
    ≈ 0, so a token's position is known only through the causal mask (docs/pipeline.md: the chain's step count
    then carries to 5 operands much better than at theta 1e4)."""
    from common import run_stage

    from rlpt.config import load_config
    from rlpt.sft import SFTJob, train_sft
    steps = S.COMPLETER_STEPS
    job = load_config(SFTJob, None, ["sft.format=cot", f"sft.steps={steps}", "eval.size=200", f"eval.every={steps}",
                                     "model.rope_theta=1e30", f"run.out_dir={OUT}", f"run.name={NOPE_C}",
                                     "run.threads=1", "run.progress=false"])
    return run_stage(NOPE_C, OUT / NOPE_C, steps, lambda resume: train_sft(job, resume=resume))


def build() -> tuple[Path, Path]:
    policy, completer = S.sft("policy", S.POLICY_STEPS), S.sft("completer", S.COMPLETER_STEPS)
    S.scorer("prm", policy, completer, LOGP, ["trunk={completer}", "scorer.logp_feature=true"])
    mix_sft()                  # prm_logp_aux: prm_logp's labelled rows, + the frozen MIX's features (calibrated start)
    S.scorer("prm", policy, completer, AUX, ["trunk={completer}", "scorer.logp_feature=true",
                                            f"scorer.logp_aux={OUT / MIX}",
                                            f"scorer.data.file={OUT / LOGP / 'steps.jsonl'}",
                                            f"scorer.data.heldout_file={OUT / LOGP / 'steps_heldout.jsonl'}"])
    nope_sft()                 # prm_logp_nope: prm_logp's labelled rows, its trunk the rope_theta=1e30 completer
    S.scorer("prm", policy, completer, NOPE, [f"trunk={OUT / NOPE_C}", "scorer.logp_feature=true",
                                             f"scorer.data.file={OUT / LOGP / 'steps.jsonl'}",
                                             f"scorer.data.heldout_file={OUT / LOGP / 'steps_heldout.jsonl'}"])
    return policy, completer


def step_errors(problem, text: str) -> list[str]:
    """Per step of `text`: "right", "after a wrong step", or what is wrong with the first wrong step (its issues
    joined by " + "): "malformed" (not a+x=c), "wrong operand" (x is not operand k+1: one skipped or repeated),
    "wrong carry" (a is not the previous result), "wrong sum", "ends early" (`#` before the last operand),
    "goes on" (`,` or a step after the last operand). The shape of the error, for reading the scores only."""
    import re

    from rlpt.search.steps import END, SEP, split_steps, true_step_labels
    steps, ops, out, prev = split_steps(text), problem.operands, [], problem.operands[0]
    for k, (body, ok) in enumerate(zip(steps, true_step_labels(problem, text))):
        m = re.fullmatch(r"(\d+)\+(\d+)=(\d+)", body.rstrip(SEP + END))
        if ok or (out and out[-1] != "right"):
            out.append("right" if ok else "after a wrong step")
            prev = int(m.group(3)) if m else None
            continue
        issues = []
        if m is None:
            issues.append("malformed")
        else:
            a, x, c = map(int, m.groups())
            issues += [name for name, bad in (("wrong operand", k + 1 >= len(ops) or x != ops[k + 1]),
                                              ("wrong carry", a != prev), ("wrong sum", c != a + x)) if bad]
        last = k == len(ops) - 2
        if body.endswith(END) and not last:
            issues.append("ends early")
        if k > len(ops) - 2 or (last and body.endswith(SEP)):
            issues.append("goes on")
        out.append(" + ".join(issues) or "malformed")
        prev = int(m.group(3)) if m else None
    return out


def step_table(only: set | None = None, old: dict | None = None) -> dict:
    """Per row set (held-out 2-4 operands: the run's own; 5 operands: the responses hard_rows draws, same seed and
    policy) and scorer: pooled step AUROC, per position, and on the 5-operand slice per kind of response.
    With `only`, just those scorers, added to `old`'s table (the rows are drawn again with the same seeds)."""
    from rlpt.engine import LLM
    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.task import ArithmeticTask, parse_prompt
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.preference.data import distinct_problems
    from rlpt.search.jobs import outcome_rows
    from rlpt.search.labels import auroc, load_rows, sample_responses
    from rlpt.search.scorer import LogProbScorer, StepScorer, load_scorer
    tok = CharTokenizer()
    llm = LLM(load_model(OUT / "policy"), tok, seed=0)
    five = ArithmeticTask(min_operands=5, max_operands=5)
    probs = distinct_problems(five, random.Random(2), 256, "heldout")
    test = {p.prompt for p in probs}     # a 5-operand dev split, other held-out problems: the aux design's choice
    dev = [p for p in distinct_problems(five, random.Random(99), 400, "heldout") if p.prompt not in test][:256]
    sets = {"held-out (2-4 operands)": load_rows(OUT / LOGP / "steps_heldout.jsonl"),
            "5 operands": outcome_rows(probs, sample_responses(llm, probs, 1.0, 40, 2)),
            "5 operands, dev": outcome_rows(dev, sample_responses(llm, dev, 1.0, 40, 99))}
    completer, mix = load_model(OUT / "completer"), load_model(OUT / MIX)
    scorers = {**{k: load_scorer(OUT / k, tok) for k in PRMS}, S.GEN: LogProbScorer(completer, tok),
               f"{MIX}_logprob": LogProbScorer(mix, tok),
               "product at step 0": StepScorer(completer, tok, "prm", True, mix),   # σ(log π_c + log π_mix)
               f"{NOPE_C}_logprob": LogProbScorer(load_model(OUT / NOPE_C), tok)}
    scorers = {k: v for k, v in scorers.items() if only is None or k in only}
    out: dict = old or {}
    for name, rows in sets.items():
        kinds = [step_errors(parse_prompt(r.prompt), r.response) for r in rows]     # per row, per step
        flat_kinds = [k for ks in kinds for k in ks if k != "right"]
        out[name] = {**out.get(name, {}), "kinds": dict(Counter(flat_kinds)), "examples": {}}
        out[name].setdefault("scorers", {})
        for r, ks in zip(rows, kinds):
            for k in ks:
                out[name]["examples"].setdefault(k, f"{r.prompt} → {r.response}")
        out[name]["counts"] = [[sum(len(r.truth) > p for r in rows), sum(len(r.truth) > p and not r.truth[p]
                                                                          for r in rows)] for p in range(3)]
        for k, sc in scorers.items():
            scores = sc.score([(r.prompt, r.response) for r in rows])
            flat = [(x, t, kd) for a, r, ks in zip(scores, rows, kinds) for x, t, kd in zip(a, r.truth, ks)]
            per = []
            for pos in range(3):
                pairs = [(a[pos], r.truth[pos]) for a, r in zip(scores, rows) if len(a) > pos]
                per.append(auroc([a for a, _ in pairs], [t for _, t in pairs])
                           if len({t for _, t in pairs}) == 2 else None)
            right = [x for x, t, _ in flat if t]       # each kind of wrong step against every right step
            by_kind = {kd: auroc(right + [x for x, t, k2 in flat if not t and k2 == kd],
                                 [True] * len(right) + [False] * sum(not t and k2 == kd for _, t, k2 in flat))
                       for kd in out[name]["kinds"] if any(not t and k2 == kd for _, t, k2 in flat)}
            out[name]["scorers"][k] = {"pooled": auroc([x for x, _, _ in flat], [t for _, t, _ in flat]),
                                       "positions": per, "by_kind": by_kind}
    return out


def diagnose(models=("policy", "completer", MIX, NOPE_C)) -> str:
    """Why 5-operand chains are malformed: each model's greedy accuracy and its probability of `#` right after a
    right first step (the chain must go on with `,` when more operands are left), on 4 and 5 operands."""
    from rlpt.engine import LLM
    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.task import ArithmeticTask
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.preference.data import distinct_problems
    from rlpt.search.steps import split_steps
    from rlpt.search.strategies import greedy
    tok = CharTokenizer()
    lines = ["| model | operands | greedy accuracy | greedy chains ending before the last operand | P(`#`) after a "
             "right first step | a greedy chain |", "|---|---:|---:|---:|---:|---|"]
    for name in models:
        model = load_model(OUT / name)
        for ops in (4, 5):
            probs = distinct_problems(ArithmeticTask(min_operands=ops, max_operands=ops), random.Random(5), 128,
                                      "heldout")
            res = greedy(LLM(model, tok, seed=0), [p.prompt for p in probs])
            early = sum(r.text.endswith("#") and len(split_steps(r.text)) < ops - 1 for r in res)
            with torch.no_grad():
                p_end = [torch.softmax(model(torch.tensor([tok.encode(p.prompt + p.cot().split(",")[0])]))[0, -1]
                                       .float(), -1)[tok.stoi["#"]].item() for p in probs[:64]]
            lines.append(f"| `{name}` | {ops} | {f3(sum(r.correct for r in res) / len(res))} | {early} / {len(res)} | "
                         f"{sum(p_end) / len(p_end):.4f} | `{res[0].prompt}` → `{res[0].text}` |")
    return "\n".join(lines)


def study(args) -> dict:
    from rlpt.engine import LLM
    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.task import ArithmeticTask
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.search.scorer import LogProbScorer, load_scorer
    from rlpt.search.strategies import greedy
    data = json.loads(PATH.read_text()) if PATH.exists() else {}
    policy, completer = build()

    def save():
        PATH.write_text(json.dumps(data))
    have = data.get("steps", {}).get("5 operands", {}).get("scorers", {})
    if any(k not in have for k in (*PRMS, f"{NOPE_C}_logprob")):
        data["steps"] = step_table(None if not have else {k for k in (*PRMS, f"{NOPE_C}_logprob") if k not in have},
                                   data.get("steps"))
        save()
    tok = CharTokenizer()
    llm = LLM(load_model(policy), tok, max_num_seqs=256)
    task = ArithmeticTask(min_operands=S.SLICE, max_operands=S.SLICE)
    both = [p.prompt for p in task.heldout_set(2 * S.PROMPTS)]
    test = both[:S.PROMPTS]
    assert test == [p.prompt for p in task.heldout_set(S.PROMPTS)], "the test slice is heldout_set(P)"
    dev = both[S.PROMPTS:S.PROMPTS + args.dev_prompts]
    if data.get("prompts", {"dev": dev, "test": test}) != {"dev": dev, "test": test}:
        raise SystemExit(f"{PATH} was made on other prompts (another --dev-prompts?): delete it to recompute")
    data["prompts"] = {"dev": dev, "test": test}
    scorers = {k: load_scorer(OUT / k, tok) for k in SEARCHED}
    for split, prompts in (("dev", dev), ("test", test)):
        data.setdefault(split, {})
        if "greedy" not in data[split]:
            g = greedy(llm, prompts)
            data[split]["greedy"] = {"greedy@1": {"correct": [int(r.correct) for r in g],
                                                  "tokens": [r.tokens for r in g]}}
            save()
    for t in args.temps:                                       # the temperature, on dev only, per PRM
        if str(t) not in data["dev"]:
            data["dev"][str(t)] = R.best_of_n_family(llm, dev, t, scorers, data["dev"]["greedy"])
            save()
        for k in SEARCHED:                                     # a PRM added later: on the same samples
            if f"weighted {k}@{NS[0]}" not in data["dev"][str(t)]["results"]:
                R.add_scorer(llm, dev, t, k, scorers[k], data["dev"]["greedy"], data["dev"][str(t)])
                save()
    data["chosen"] = {k: max(args.temps, key=lambda t: margin(data["dev"][str(t)]["results"], k)) for k in SEARCHED}
    for k, chosen in data["chosen"].items():                   # the test slice, once per PRM, at its chosen T
        if str(chosen) not in data["test"]:
            gen = {**scorers, S.GEN: LogProbScorer(load_model(completer), tok)}
            data["test"][str(chosen)] = R.best_of_n_family(llm, test, chosen, gen, data["test"]["greedy"])
            save()
        if f"weighted {k}@{NS[0]}" not in data["test"][str(chosen)]["results"]:
            R.add_scorer(llm, test, chosen, k, scorers[k], data["test"]["greedy"], data["test"][str(chosen)])
            save()
    return data


def margin(res: dict, prm: str = LOGP) -> float:
    """The bar's worst margin on point estimates: min over N of min(weighted `prm` − majority, majority − greedy)."""
    def acc(k: str) -> float:
        return sum(res[k]["correct"]) / len(res[k]["correct"])
    return min(min(acc(f"weighted {prm}@{n}") - acc(f"majority@{n}"), acc(f"majority@{n}") - acc("greedy@1"))
               for n in NS)


def report(data: dict) -> str:
    st = data["steps"]
    lines = ["| rows | steps at position 1 / 2 / 3 (wrong) | scorer | pooled step AUROC "
             "| AUROC at position 1 / 2 / 3 |", "|---|---|---|---:|---|"]
    for name, d in st.items():
        counts = " / ".join(f"{a} ({b})" for a, b in d["counts"])
        for k, s in d["scorers"].items():
            lines.append(f"| {name} | {counts} | `{k}` | {f3(s['pooled'])} | {' / '.join(map(f3, s['positions']))} |")
    for name, d in st.items():
        kinds = sorted(d["kinds"], key=lambda k: -d["kinds"][k])
        lines += ["", f"{name}: the wrong steps by what is wrong (the first wrong step of a chain; the steps after it "
                  "are \"after a wrong step\"), and each scorer's AUROC of those steps against every right step", "",
                  "| wrong step | steps | an example chain | " +
                  " | ".join(f"`{k}`" for k in d["scorers"]) + " |", "|---|---:|---|" + "---:|" * len(d["scorers"])]
        for kd in kinds:
            lines.append(f"| {kd} | {d['kinds'][kd]} | `{d['examples'][kd]}` | " +
                         " | ".join(f3(s["by_kind"].get(kd)) for s in d["scorers"].values()) + " |")
    for k in PRMS:
        if not (OUT / k / "metrics.jsonl").exists():
            continue
        rows = read_rows(OUT / k)
        fin, first = rows[-1], next(r for r in rows if "prm/step_auroc_heldout" in r)
        lines += ["", f"`{k}` run: step AUROC held-out {f3(fin.get('prm/step_auroc_heldout'))} (bar 0.90; "
                  f"{f3(first['prm/step_auroc_heldout'])} at step 0), 5 operands {f3(fin.get('prm/step_auroc_5ops'))} "
                  f"(bar 0.85); outcome AUROC held-out {f3(fin.get('prm/outcome_auroc_heldout'))}; BCE held-out "
                  f"{f3(fin.get('loss/bce_heldout'))}; seconds {f3(max(r.get('time/elapsed', 0) for r in rows))}."]
        lines += [f"`{k}` held-out evals (step: BCE, step AUROC): " + ", ".join(
            f"{r['step']}: {f3(r['loss/bce_heldout'])}, {f3(r['prm/step_auroc_heldout'])}" for r in rows
            if "prm/step_auroc_heldout" in r) + f"; last step logged {rows[-1]['step']}."]
    if "chosen" not in data:
        return "\n".join(lines)
    chosen = data["chosen"] if isinstance(data["chosen"], dict) else {LOGP: data["chosen"]}
    dg = data["dev"]["greedy"]["greedy@1"]["correct"]
    prms = [k for k in SEARCHED if k in chosen]
    lines += ["", f"Dev split ({len(data['prompts']['dev'])} prompts), greedy {f3(sum(dg) / len(dg))}; accuracy at "
              "N = " + " / ".join(map(str, NS)) + "; the bar's worst margin per PRM:", "",
              "| T | majority | " + " | ".join(f"weighted `{k}` · within-prompt AUROC · margin" for k in prms) + " |",
              "|---:|---|" + "---|" * len(prms)]
    for t, d in data["dev"].items():
        if t == "greedy":
            continue
        res = {**d["results"], **data["dev"]["greedy"]}

        def accs(k: str, res=res) -> str:
            return " / ".join(f3(sum(res[f"{k}@{n}"]["correct"]) / len(res[f"{k}@{n}"]["correct"])) for n in NS)
        lines.append(f"| {t} | {accs('majority')} | " + " | ".join(
            f"{accs(f'weighted {k}')} · {f3(d['selection'][k]['within_auroc'])} · {margin(res, k):+.3f}"
            for k in prms) + " |")
    for k in prms:
        key = str(chosen[k])
        res = {**data["test"][key]["results"], **data["test"]["greedy"]}
        sel = data["test"][key]["selection"]
        lines += ["", f"`{k}`: chosen on dev T = {key}. Test slice ({len(data['prompts']['test'])} prompts):", "",
                  "| strategy | " + " | ".join(f"N={n}: acc [95% CI] · tokens" for n in NS) + " |",
                  "|---|" + "---|" * len(NS), f"| greedy | {R.acc_cell(res['greedy@1'])} |" + " |" * (len(NS) - 1)]
        for name in ("majority", f"weighted {k}", f"best_of_n {k} last", f"weighted {S.GEN}", "pass@n (oracle)"):
            lines.append(f"| {name} | " + " | ".join(R.acc_cell(res[f"{name}@{n}"]) for n in NS) + " |")
        lines += ["", "| comparison (paired over prompts) | " + " | ".join(f"N={n}" for n in NS) + " |",
                  "|---|" + "---|" * len(NS)]
        for label, a, b in ((f"weighted `{k}` − majority", f"weighted {k}", "majority"),
                            ("majority − greedy", "majority", "greedy"),
                            (f"best-of-N `{k}` − majority", f"best_of_n {k} last", "majority"),
                            (f"weighted `{k}` − weighted `{S.GEN}`", f"weighted {k}", f"weighted {S.GEN}")):
            lines.append(f"| {label} | " + " | ".join(
                S.ci(S.diff(res, f"{a}@{n}", "greedy@1" if b == "greedy" else f"{b}@{n}"), True) for n in NS) + " |")
        ws = [S.diff(res, f"weighted {k}@{n}", f"majority@{n}") for n in NS]
        ms = [S.diff(res, f"majority@{n}", "greedy@1") for n in NS]
        met = all(w[2] >= 0 and m[2] >= 0 for w, m in zip(ws, ms))
        lines += ["", f"Bar with `{k}`: " + "; ".join(f"N={n}: weighted {R.side(w)} majority, majority {R.side(m)} "
                                                     "greedy" for n, w, m in zip(NS, ws, ms))
                  + (": **met** (no comparison significantly below)." if met else ": **not met**."),
                  "Within-prompt outcome AUROC on the test candidates (pooled): " + ", ".join(
                      f"`{x}` {f3(sel[x]['within_auroc'])} ({f3(sel[x]['pooled_auroc'])})" for x in sel
                      if x != "random")]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--temps", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.7, 1.0])
    ap.add_argument("--dev-prompts", type=int, default=S.PROMPTS)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--diagnose", action="store_true", help="the 5-operand diagnosis table only")
    ap.add_argument("--models", default=f"policy,completer,{MIX},{NOPE_C}", help="--diagnose: the run folders")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.diagnose:
        print(diagnose(args.models.split(",")))
        return 0
    print(report(json.loads(PATH.read_text()) if args.report_only else study(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
