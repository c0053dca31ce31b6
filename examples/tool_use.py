"""Tool use vs no tool on 3-digit addition (lesson 08): same SFT steps, same GRPO budget, two runs.

    python examples/tool_use.py [key=value ...] [--report-only]

(a) `recipes/tool_arith.yaml` as written: SFT on calculator traces (`sft.format=tool`, the tool's reply
    masked out of the loss), then GRPO with `env.name=calculator` (agent loop: the tool answers `c(...)`).
(b) the same recipe with `sft.format=direct env.name=arithmetic`: the bare model answers in one decode.
Same seed, SFT steps, GRPO steps, B×K, lr and held-out set. Held-out accuracy of (a) is measured with the
calculator running (the agent loop, greedy); of (b) with one greedy decode. Writes docs/tool_use.md and
docs/tool_use_heldout.png from the two runs' metrics.jsonl (runs under runs/tool_use/).
"""
from __future__ import annotations

import sys
from pathlib import Path

from common import DOCS, ROOT, f3, mean_last, read_rows, run_stage, series, split_args

from rlpt.report import figure, machine

RECIPE = ROOT / "recipes" / "tool_arith.yaml"
OUT_DIR = "runs/tool_use"
RUNS = {"tool": [], "no_tool": ["sft.format=direct", "env.name=arithmetic"]}
LABEL = {"tool": "(a) tool: SFT on tool traces + GRPO, env calculator",
         "no_tool": "(b) no tool: SFT direct + GRPO, env arithmetic"}


def jobs(overrides: list[str]) -> dict:
    from rlpt.train import load_train_job
    return {name: load_train_job(str(RECIPE), [f"run.out_dir={OUT_DIR}", f"run.name={name}", *extra, *overrides])
            for name, extra in RUNS.items()}


def run_dir(job) -> Path:
    return Path(job.run.out_dir) / job.run.name


def where_it_fails(job, checkpoint: Path) -> dict:
    """Greedy held-out episodes of a tool model, split by what went wrong: the call's operands (a bad copy of
    the prompt), or the final answer (a bad copy of the tool's reply)."""
    import rlpt.envs  # noqa: F401
    from rlpt.framework.agent_loop import MultiTurnRollout
    from rlpt.framework.environment import make_env
    from rlpt.gpt_mini.generate import SamplingParams
    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.task import make_task
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    tok = CharTokenizer()
    env = make_env(job.env.name, task=make_task(job.task), tokenizer=tok)
    greedy = SamplingParams(max_tokens=job.rollout.max_tokens, temperature=0.0)
    eng = MultiTurnRollout(load_model(checkpoint), tok, 1, greedy, max_turns=job.rollout.max_turns,
                                 turn_tokens=job.rollout.turn_tokens)
    eps = [eng._start(env, q, i) for i, q in enumerate(env.heldout(job.eval.size))]
    eng.run_episodes(env, eps, greedy)
    out = {"correct": 0, "wrong call": 0, "right call, wrong answer": 0}
    for e in eps:
        call = tok.decode(e.response).split("#")[0]
        if e.reward > 0:
            out["correct"] += 1
        elif call != "c(" + "+".join(map(str, e.prompt.meta["operands"])) + ")":
            out["wrong call"] += 1
        else:
            out["right call, wrong answer"] += 1
    return out


def write_page(js: dict, argv: list[str]) -> Path:
    docs = DOCS
    rows = {n: read_rows(run_dir(j)) for n, j in js.items()}
    sft_rows = {n: read_rows(run_dir(j) / "sft") for n, j in js.items()}
    png = docs / "tool_use_heldout.png"
    with figure(png) as ax:
        for n, r in rows.items():
            pts = series(r, "acc/heldout")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=LABEL[n])
        ax.set_xlabel("GRPO step (0 = the SFT start)")
        ax.set_ylabel("held-out greedy accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
        ax.set_title("3-digit addition: with the calculator tool vs without")

    j = js["tool"]
    head = ("| run | SFT format | env | held-out acc, SFT start | held-out acc, after GRPO | best | "
            "tool calls / response | tool errors / response | train reward, last 10 steps | GRPO steps skipped | "
            "RL seconds |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in rows.items():
        acc = series(r, "acc/heldout")
        calls, errs = series(r, "tool/calls_heldout"), series(r, "tool/errors_heldout")
        tc = f"{f3(calls[0][1])} → {f3(calls[-1][1])}" if calls else "— (no tool)"
        te = f"{f3(errs[0][1])} → {f3(errs[-1][1])}" if errs else "—"
        secs = max((x.get("time/elapsed", 0.0) for x in r), default=0.0)
        lines.append(f"| {n} | {js[n].sft.format} | {js[n].env.name} | {f3(acc[0][1])} | {f3(acc[-1][1])} | "
                     f"{f3(max(a for _, a in acc))} | {tc} | {te} | {f3(mean_last(r, 'reward/mean'))} | "
                     f"{sum(int(x.get('step/skipped', 0)) for x in r)} of {js[n].steps} | {secs:.0f} |")
    sft_lines = []
    for n, r in sft_rows.items():
        pts = dict(series(r, "acc/heldout"))    # the final eval repeats the last step's
        sft_lines.append(f"- {n}: " + ", ".join(f"step {s} {a:.3f}" for s, a in pts.items()))
    tps = {n: mean_last(r, "tokens/step", n=10 ** 9) for n, r in sft_rows.items()}
    sft_lines.append("- SFT target tokens per step (mask 1), mean: "
                     + ", ".join(f"{n} {v:.0f}" for n, v in tps.items() if v is not None))
    curve = ["| GRPO step | " + " | ".join(rows) + " |", "|---:|" + "---:|" * len(rows)]
    steps = sorted({s for r in rows.values() for s, _ in series(r, "acc/heldout")})
    for s in steps:
        vals = [dict(series(r, "acc/heldout")).get(s) for r in rows.values()]
        curve.append(f"| {s} | " + " | ".join(f3(v) for v in vals) + " |")
    fails = {"SFT start": where_it_fails(j, run_dir(j) / "sft"), "after GRPO": where_it_fails(j, run_dir(j))}
    kinds = list(fails["SFT start"])
    fail_lines = ["| tool run, greedy held-out | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    fail_lines += [f"| {w} | " + " | ".join(str(f[k]) for k in kinds) + " |" for w, f in fails.items()]
    extra = " ".join(argv)
    text = f"""# Tool use: a calculator makes 3-digit addition solvable (lesson 08)

**Machine.** {machine()}; accuracies move with the CPU (its MKL kernels change float results),
so read the differences, not the third digit.

Command (2-core CPU, 1 thread; both runs, then this page, nothing typed in by hand):

```bash
python examples/tool_use.py{(' ' + extra) if extra else ''}
```

It trains two runs from `recipes/tool_arith.yaml` (folders under `{OUT_DIR}/`), each first its own SFT
start ({j.sft.steps} steps, batch {j.sft.batch_size}) and then GRPO ({j.steps} steps, {j.rollout.prompts_per_step}
prompts × {j.rollout.k} samples, temperature {j.rollout.temperature}, lr {j.trainer.optim.lr:g}, β =
{getattr(j.algorithm, 'beta', 'default')}); the only differences are the two keys of run (b):

- (a) tool: `sft.format=tool` (demonstrations `c(123+456+789)#` `=1368#` `1368#`, the tool's reply `=1368#`
  masked out of the loss) and `env.name=calculator` (the agent loop: at most {j.rollout.max_turns} assistant
  turns, {j.rollout.max_tokens} response tokens with the tool's output included).
- (b) no tool: `sft.format=direct` (`1368#`) and `env.name=arithmetic` (one decode).

Task: {j.task.min_operands}–{j.task.max_operands} operands in {j.task.min_value}..{j.task.max_value};
held-out set of {j.eval.size} problems disjoint from training (`task.heldout_frac`), greedy decoding;
(a) is scored with the calculator answering its calls, as it would be deployed. Model: gpt_mini
{j.model.n_layer} layers × d {j.model.d_model}, `model.max_seq_len={j.model.max_seq_len}` (a prompt plus its tool
trace is at most 13 + 26 = 39 tokens).

{chr(10).join(lines)}

Tool calls and errors are per held-out response, at GRPO step 0 → at the end. A GRPO step is skipped when
every group is degenerate (all K rewards equal: zero advantage, no gradient).

![held-out accuracy vs step]({png.name})

Where the tool run fails ({j.eval.size} held-out problems; a wrong call is a bad copy of the prompt's operands
into `c(...)`, a wrong answer after a right call a bad copy of the tool's reply):

{chr(10).join(fail_lines)}

Held-out accuracy during the SFT starts:
{chr(10).join(sft_lines)}

Held-out accuracy by GRPO step:

{chr(10).join(curve)}
"""
    page = docs / "tool_use.md"
    page.write_text(text + "\n" + NOTES.strip() + "\n")
    return page


# What was measured while setting the recipe up (probe runs, same machine; not re-run by this script).
NOTES = """
## How the recipe was set, and what it shows

- **The trace is the bare one.** `sft.format=tool` trains on `c(123+456+789)#` `=1368#` `1368#`
  (`sft_tool_trace` in `rlpt/envs/calculator.py`), not on the lesson's wordy `let me compute c(123+456+789)#`
  `=1368#` `the answer is 1368#` (`tool_use_trace`, still the agent-loop test fixture). With the wordy trace
  this model learned no copying in 300 SFT steps (probes with 200- and 800-step schedules: loss stuck at
  0.50–0.52 per token, held-out 0.00 at steps 100, 200 and 300, the call held plausible but unrelated operands
  such as `c(586+566+588)`); with the bare trace it reached 0.54 held-out at step 100 and 0.88 at step 200
  (probe with a 600-step schedule). Either way the policy must
  copy the operands into the call and copy the tool's reply into its answer; the reply itself is never a
  target (mask 0), so the model does not learn to predict sums.
- **The SFT start is short on purpose** (100 steps, cosine to 0.1×): the tool start answers about two thirds
  of the held-out set, so GRPO has room. Its gain comes from making the copies reliable (the failure table
  above): calls stay at one per response with no tool errors, since the SFT start already calls the tool
  every time.
- **The bare model gets nothing**: after the same 100 direct SFT steps it does not produce one correct
  3-digit sum on the held-out set, so nearly every GRPO group is all-zero reward and the step is skipped: RL
  cannot reinforce what the policy never samples. Same steps and batch is not the same number of tokens:
  a tool trace is longer than `1368#`, so the tool arm's SFT trains on more target tokens per step (the
  line under the SFT curves above). Giving the bare model more does not change the picture: a probe of 600
  direct SFT steps
  (about 1.6× the tool arm's SFT tokens) ends at 0.005 held-out (0.000 at steps 100–300, 0.005 at 400,
  0.010 at 500).
"""


def main(argv: list[str]) -> int:
    from rlpt.train import run_train
    overrides, report_only = split_args(argv)
    js = jobs(overrides)
    if not report_only:
        for name, job in js.items():
            print(f"[tool_use] run {name}: {LABEL[name]}")
            run_stage(name, run_dir(job), job.steps, lambda resume, job=job: run_train(job, resume=resume))
    print(f"[tool_use] wrote {write_page(js, overrides)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
