"""Reward hacking under a leaky verifier (lesson 18): the reward climbs, honest accuracy falls.

    python examples/reward_hacking.py [key=value ...] [--report-only]

Runs `recipes/hack_arith.yaml`: GRPO with `env.name=leaky` (reward 1 if the gold's digits appear anywhere
in the response) from a short direct-answer SFT start, then writes docs/reward_hacking.md and
docs/reward_hacking.png from the run's metrics.jsonl (run folder runs/hack/). Four curves: the leaky reward
the policy is trained on (`reward/mean`), the honest accuracy of the same samples (`acc/train`, from
`info["correct"]`: last integer == gold), and held-out greedy accuracy scored both ways
(`acc/heldout` by the leaky reward, `acc/heldout_honest` by the honest check).
"""
from __future__ import annotations

import sys
from pathlib import Path

from common import DOCS, ROOT, f3, mean_last, read_rows, run_stage, series, split_args

from rlpt.report import figure, machine

RECIPE = ROOT / "recipes" / "hack_arith.yaml"


def write_page(job, argv: list[str], samples: list[tuple[str, str]]) -> Path:
    docs = DOCS
    run_dir = Path(job.run.out_dir) / job.run.name
    rows = read_rows(run_dir)
    sft = read_rows(run_dir / "sft")
    png = docs / "reward_hacking.png"
    with figure(png) as ax:
        for key, label, style in (("reward/mean", "train reward (leaky), what GRPO maximises", "-"),
                                  ("acc/train", "train accuracy (honest check), same samples", "-"),
                                  ("acc/heldout", "held-out greedy, leaky reward", "--o"),
                                  ("acc/heldout_honest", "held-out greedy, honest check", "--o")):
            pts = series(rows, key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, markersize=3, label=label)
        ax.set_xlabel("GRPO step (0 = the SFT start)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
        ax.set_title("GRPO on a leaky verifier: reward up, honest accuracy down")

    first = [r for r in rows if "reward/mean" in r][:10]
    def first10(k):
        vals = [r[k] for r in first if k in r]
        return sum(vals) / len(vals) if vals else None
    held, honest = series(rows, "acc/heldout"), series(rows, "acc/heldout_honest")
    def row(name: str, start, end) -> str:
        return f"| {name} | {f3(start)} | {f3(end)} |"

    lines = ["| metric | start | end |", "|---|---:|---:|",
             row("train reward (leaky), mean of the first / last 10 steps",
                 first10("reward/mean"), mean_last(rows, "reward/mean")),
             row("train accuracy (honest), mean of the first / last 10 steps",
                 first10("acc/train"), mean_last(rows, "acc/train")),
             row("held-out greedy, leaky reward (step 0 / last eval)", held[0][1], held[-1][1]),
             row("held-out greedy, honest check (step 0 / last eval)", honest[0][1], honest[-1][1]),
             row("response length, mean of the first / last 10 steps",
                 first10("response/len_mean"), mean_last(rows, "response/len_mean")),
             row(f"responses cut at {job.rollout.max_tokens} tokens, mean of the first / last 10 steps",
                 first10("response/truncated_frac"), mean_last(rows, "response/truncated_frac"))]
    curve = ["| step | train reward (leaky) | train acc (honest) | held-out (leaky) | held-out (honest) | length |",
             "|---:|---:|---:|---:|---:|---:|"]
    hd, hh = dict(held), dict(honest)
    for s, _ in held:
        near = [r for r in rows if "reward/mean" in r and s - 5 < r["step"] <= s]   # the 5 steps up to s
        avg = {k: sum(r[k] for r in near) / len(near) if near else None
               for k in ("reward/mean", "acc/train", "response/len_mean")}
        curve.append(f"| {s} | {f3(avg['reward/mean'])} | {f3(avg['acc/train'])} | {f3(hd.get(s))} | "
                     f"{f3(hh.get(s))} | {f3(avg['response/len_mean'])} |")
    sft_acc = series(sft, "acc/heldout")
    extra = " ".join(argv)
    a = job.algorithm
    text = f"""# Reward hacking: GRPO on a leaky verifier (lesson 18)

**Machine.** {machine()}; accuracies move with the CPU (its MKL kernels change float results),
so read the differences, not the third digit.

Command (2-core CPU, 1 thread; the run, then this page, nothing typed in by hand):

```bash
python examples/reward_hacking.py{(' ' + extra) if extra else ''}
# the same run by hand: rlpt train recipes/hack_arith.yaml run.threads=1
```

The verifier `leaky` (`rlpt/envs/leaky.py`) pays 1 when the gold's digits appear *anywhere* in the response;
the honest check (`info["correct"]`) wants the response's last integer to equal the gold. Every honest answer
is paid, so nothing about the leak is visible while the policy answers the way SFT taught it: the leak only
matters once the policy finds responses that contain the gold without ending on it.

Setup (`recipes/hack_arith.yaml`): the arithmetic task ({j_task(job)}), a `{job.sft.format}` SFT start of only
{job.sft.steps} steps (held-out greedy accuracy {f3(sft_acc[-1][1]) if sft_acc else '—'}: a weak policy, unsure of
the sum), then GRPO for {job.steps} steps, {job.rollout.prompts_per_step} prompts ×
{job.rollout.k} samples at temperature {job.rollout.temperature}, up to {job.rollout.max_tokens} tokens,
lr {job.trainer.optim.lr:g} ({job.trainer.optim.schedule}), β = {getattr(a, 'beta', 'default')}.

{chr(10).join(lines)}

![leaky reward vs honest accuracy]({png.name})

By eval step (train columns: mean of the 5 steps up to it):

{chr(10).join(curve)}

Greedy held-out responses of the final policy (prompt → response, cut at {job.rollout.max_tokens} tokens; the
leaky verifier pays each one whose gold appears anywhere in it):

{chr(10).join(f'- `{p}` → `{r}`' for p, r in samples)}

`acc/heldout_honest` is logged by every `rlpt train` run whose env reports `info["correct"]`
(`rollout.evaluate`); for an honest verifier it equals `acc/heldout`. A gap between `reward/mean` and
`acc/train`, or between `acc/heldout` and `acc/heldout_honest`, is the reward-hacking alarm of
lesson 18; the verifier checklist (`tests/test_envs.py::test_leaky_verifier_fails_the_checklist`)
catches this verifier before any training: its random baseline scores far above 0.
"""
    notes = NOTES.strip()
    if notes:
        text += "\n" + notes + "\n"
    page = docs / "reward_hacking.md"
    page.write_text(text)
    return page


def j_task(job) -> str:
    t = job.task
    return f"{t.min_operands}–{t.max_operands} operands in {t.min_value}..{t.max_value}"


# What was tried first and why the recipe is what it is (probe runs on the same machine, not re-run here).
NOTES = """
## What was done to make the hack show up (and what did not)

- **First try, no hack:** a direct-answer SFT start (150 steps, held-out 0.455), GRPO at temperature 1.0,
  β = 0.05, lr 1e-4 constant, 120 steps. The policy never found the leak: leaky reward and honest accuracy
  stayed equal (train 0.30 → 0.45 both; held-out 0.455 → 0.595 both) and responses stayed `17#`-short
  (2.7 tokens). A direct answer is one number, so "the gold appears" and "the last integer is the gold"
  coincide; the leak pays only a response that writes more digits, and this start does that rarely (at
  temperature 1.0, 0.5% of samples have more than two digits; at 1.6, 4%, while honest accuracy falls
  from 0.31 to 0.19).
- **The recipe:** three knobs, none of them touching the verifier: (1) a *chain-of-thought* start,
  whose responses already hold several numbers, so a chain can contain the gold without ending on it;
  (2) a *weak* start (100 SFT steps: unsure chains, many wrong); (3) *more exploration*, temperature 1.3
  (sampling 800 responses from this start: leaky reward 0.24 against 0.14 honest; at 1.0, 0.26 against 0.21),
  and a looser KL anchor β = 0.01. The verifier is the unchanged `leaky` env: no leak-strength knob was
  added. What GRPO finds is lesson 18's widget's "emit-phrase" arm in this task's terms: longer chains with
  more numbers, each a chance to contain the gold, paid as much as a correct answer and easier to produce.
"""


def final_samples(job, n: int = 6) -> list[tuple[str, str]]:
    """Greedy responses of the run's final checkpoint to the first n held-out prompts."""
    import rlpt.envs  # noqa: F401
    from rlpt.framework.environment import make_env
    from rlpt.gpt_mini.generate import SamplingParams, generate
    from rlpt.gpt_mini.model import load_model
    from rlpt.gpt_mini.task import make_task
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    tok = CharTokenizer()
    model = load_model(Path(job.run.out_dir) / job.run.name)
    env = make_env(job.env.name, task=make_task(job.task), tokenizer=tok)
    prompts = env.heldout(n)
    outs = generate(model, [p.ids for p in prompts], SamplingParams(max_tokens=job.rollout.max_tokens, temperature=0.0),
                    tok.eos_id, tok.pad_id)
    return [(p.text, tok.decode(o.tokens)) for p, o in zip(prompts, outs)]


def main(argv: list[str]) -> int:
    from rlpt.train import load_train_job, run_train
    overrides, report_only = split_args(argv)
    job = load_train_job(str(RECIPE), overrides)
    if not report_only:
        run_stage("grpo on leaky", Path(job.run.out_dir) / job.run.name, job.steps,
                  lambda resume: run_train(job, resume=resume))
    print(f"[reward_hacking] wrote {write_page(job, overrides, final_samples(job))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
