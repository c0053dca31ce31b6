"""RLHF on the toy, end to end (lesson 15): a hidden "human" -> a reward model -> PPO against it, over β.

    1 SFT    `rlpt.sft.train_sft` on demonstrations in both styles: `12#` (concise) and `3+4=7,7+5=12#` (worked)
    2 RM     `rlpt.preference.reward_model.train_rm`: Bradley–Terry on pairs of the SFT policy's own samples,
             labelled by the hidden human (`rm.pairs.preference=human`, reward_model.human_score):
             right and concise (2) ≻ right and verbose (1) ≻ wrong (0)
    3 PPO    `rlpt.train.run_train` with `env.name=reward_model`: max E[r̂(x, y)] − β·KL(π‖π_SFT), one run per
             β of the sweep, policy and anchor = π_SFT

The human is hidden from the policy: PPO sees only r̂. Each PPO run keeps a checkpoint every `ppo.eval_every`
steps; afterwards each checkpoint samples held-out prompts at the rollout temperature, and the mean RM score r̂
is recorded next to the mean *gold* (human) score of the same samples. Over-optimisation (Gao et al. 2022) is
r̂ still rising while gold flattens or falls: the policy finds what the RM over-rewards off the distribution it
was trained on, and the smaller β, the further it is free to go (the KL is the off-distribution defence,
lesson 15). Results: `docs/rlhf.md`, plot `docs/rlhf_overoptimisation.png`.

    python examples/rlhf.py recipes/rlhf_arith.yaml [key=value ...] [--write-docs]   (run.threads=1 on a shared box)

Run folders: runs/<run.name>/sft, rm, ppo_beta<β>, each an ordinary run folder of its job. A finished one is
reused and an interrupted one continued (`--resume`), so a rerun redoes only what is missing; the proxy/gold
scores of every checkpoint are recomputed each time (seeded: the same numbers). `--write-docs` (re)writes
docs/rlhf.md and docs/rlhf_overoptimisation.png from the sweep; `--report-only` writes them from a finished
sweep's sweep.json without running anything.
"""
from __future__ import annotations

import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Literal

import torch
from common import DOCS, read_rows, run_stage
from pydantic import Field

from rlpt.config import EvalConfig, ModelConfig, RunConfig, Section, SFTConfig, TaskConfig, load_config
from rlpt.framework.trajectory import pad_sequences
from rlpt.gpt_mini.generate import SamplingParams, generate
from rlpt.gpt_mini.model import load_model
from rlpt.gpt_mini.task import ArithmeticTask, make_task, parse_prompt
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.preference.data import collate_pairs, load_pairs
from rlpt.preference.reward_model import (
    RewardModel,
    RMConfig,
    RMJob,
    human_score,
    is_concise,
    load_reward_model,
    pair_metrics,
    train_rm,
)
from rlpt.report import figure, machine
from rlpt.sft import SFTJob, train_sft
from rlpt.train import TrainJob, run_train


class MixedSFTConfig(SFTConfig):
    """SFT on both styles. `format` only picks the held-out evaluation (arithmetic for both plain formats):
    the demonstrations come from `mixed_demonstrations`."""
    steps: int = Field(400, ge=1)
    format: Literal["direct", "cot"] = "cot"
    p_direct: float = Field(0.5, ge=0, le=1, description="share of concise (`12#`) demonstrations")


class PPOSweepConfig(Section):
    betas: list[float] = Field([1.0, 0.1, 0.01, 0.0], description="KL coefficients, one PPO run each")
    steps: int = Field(60, ge=1)
    k: int = Field(4, ge=1)
    prompts_per_step: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    max_tokens: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    epochs: int = Field(2, ge=1)
    mini_batches: int = Field(2, ge=1)
    eval_every: int = Field(10, ge=1)
    eval_prompts: int = Field(128, ge=1, description="held-out prompts sampled (k each) for r̂ and gold")


class RLHFJob(Section):
    run: RunConfig = RunConfig(name="rlhf")
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    sft: MixedSFTConfig = MixedSFTConfig()
    eval: EvalConfig = EvalConfig()
    rm: RMConfig = RMConfig(steps=300)
    ppo: PPOSweepConfig = PPOSweepConfig()


# -- stage 1: SFT on both styles ------------------------------------------------------------------------------
def mixed_demonstrations(task: ArithmeticTask, tok: CharTokenizer, batch_size: int, p_direct: float):
    """One SFT batch: each problem concise with probability p_direct, else worked. The policy then samples both
    styles, so the RM sees both and PPO can move between them.

    Each style weighs by its share of the batch, its tokens averaged within it: loss = Σ_s (n_s/N)·(mean NLL
    over style s's tokens). The weights sum to 1, so sft_loss's masked mean is this sum. A plain token mean
    would let the longer worked traces dominate; this one gives a concise answer's few tokens more weight, and
    the SFT policy samples concise more often than p_direct (0.83 of its held-out samples at p_direct 0.5 in
    docs/rlhf.md)."""
    def draw(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        problems = [task.sample(rng, "train") for _ in range(batch_size)]
        styles = ["direct" if rng.random() < p_direct else "cot" for _ in problems]
        responses = [tok.encode(p.response(s)) for p, s in zip(problems, styles)]
        count = {s: styles.count(s) for s in set(styles)}
        tokens = {s: sum(len(r) for r, t in zip(responses, styles) if t == s) for s in count}
        weights = [[count[s] / (len(problems) * tokens[s])] * len(r) for r, s in zip(responses, styles)]
        return pad_sequences([tok.encode(p.prompt) for p in problems], responses, tok.pad_id, weights)
    return draw


def sft_stage(job: RLHFJob, root: Path) -> Path:
    cfg = job.sft
    sft_job = SFTJob(run=job.run.model_copy(update={"out_dir": str(root), "name": "sft"}), model=job.model,
                     task=job.task, sft=SFTConfig(**cfg.model_dump(exclude={"p_direct"})), eval=job.eval)
    demos = mixed_demonstrations(make_task(job.task), CharTokenizer(), cfg.batch_size, cfg.p_direct)
    return run_stage("SFT (both styles)", root / "sft", cfg.steps,
                     lambda resume: train_sft(sft_job, resume=resume, demonstrations=demos))


# -- stage 2: the reward model, labelled by the hidden human ----------------------------------------------------
def rm_stage(job: RLHFJob, root: Path, sft_ck: Path) -> Path:
    rm_cfg = job.rm.model_copy(update={"pairs": job.rm.pairs.model_copy(update={"preference": "human"})})
    rm_job = RMJob(run=job.run.model_copy(update={"out_dir": str(root), "name": "rm"}), model=job.model,
                   task=job.task, init_from=str(sft_ck), rm=rm_cfg)
    run_stage("reward model", root / "rm", rm_cfg.steps, lambda resume: train_rm(rm_job, resume=resume))
    return root / "rm"


@torch.no_grad()
def rm_summary(rm_dir: Path, max_seq_len: int) -> dict:
    """The RM's final numbers, from its run folder: held-out pair metrics, pair counts, and its accuracy by kind
    of held-out pair (gold of chosen vs rejected): what the RM really learned."""
    tok = CharTokenizer()
    rm = load_reward_model(rm_dir, tok)
    train = load_pairs(rm_dir / "pairs.jsonl", tok, max_seq_len)[0]
    held = load_pairs(rm_dir / "pairs_heldout.jsonl", tok, max_seq_len)[0]
    b = collate_pairs(held, tok)
    scores = rm(b.ids)                                                   # (2N,) chosen rows, then rejected
    gaps = scores[:b.n] - scores[b.n:]
    kinds = defaultdict(list)
    names = {2.0: "right, concise", 1.0: "right, worked", 0.0: "wrong"}
    for p, g in zip(held, gaps.tolist()):
        gold = parse_prompt(p.prompt).gold
        kinds[(human_score(p.chosen, gold), human_score(p.rejected, gold))].append(g > 0)
    by_kind = [(f"{names[c]} ≻ {names[r]}", len(v), sum(v) / len(v)) for (c, r), v in sorted(kinds.items(),
                                                                                           reverse=True)]
    return {**pair_metrics(rm, held, tok), "pairs/train": len(train), "pairs/heldout": len(held), "by_kind": by_kind}


# -- stage 3: PPO against the RM, gold measured on the side -----------------------------------------------------
@torch.no_grad()
def gold_vs_proxy(model, rm, tok, problems, k: int, temperature: float, max_tokens: int, seed: int) -> dict:
    """Sample k responses per held-out prompt; mean RM score, mean gold (human) score, and their parts."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [tok.encode(p.prompt) for p in problems for _ in range(k)]
    outs = generate(model, prompts, SamplingParams(max_tokens=max_tokens, temperature=temperature),
                    tok.eos_id, tok.pad_id, gen)
    texts = [tok.decode(o.tokens) for o in outs]
    golds = [problems[i // k].gold for i in range(len(texts))]
    rm_scores = rm.score_texts(tok, list(zip(prompts, texts)))
    gold = [human_score(t, g) for t, g in zip(texts, golds)]
    n = len(texts)
    return {"rm/score": sum(rm_scores) / n, "gold/score": sum(gold) / n,
            "gold/correct": sum(s > 0 for s in gold) / n, "gold/concise": sum(is_concise(t) for t in texts) / n,
            "response/len_mean": sum(len(o.tokens) for o in outs) / n}


def ppo_job(job: RLHFJob, root: Path, sft_ck: Path, rm_dir: Path, beta: float) -> TrainJob:
    """An ordinary `rlpt train` job: PPO from the SFT checkpoint against the RM, a checkpoint every eval_every
    steps (all kept: the proxy/gold curve is read from them)."""
    p = job.ppo
    return load_config(TrainJob, None, [], base={
        "run": {**job.run.model_dump(), "name": f"ppo_beta{beta:g}", "out_dir": str(root)},
        "model": job.model.model_dump(), "task": job.task.model_dump(),
        "env": {"name": "reward_model", "model_path": str(rm_dir)}, "init_from": str(sft_ck),
        "rollout": {"k": p.k, "prompts_per_step": p.prompts_per_step, "temperature": p.temperature,
                    "max_tokens": p.max_tokens},
        "algorithm": {"name": "ppo", "beta": beta},
        "trainer": {"optim": {"lr": p.lr, "warmup_steps": 0, "schedule": "constant"}, "epochs": p.epochs,
                    "mini_batches": p.mini_batches},
        "steps": p.steps, "eval": {"every": p.eval_every, "size": p.eval_prompts},
        "ckpt_every": p.eval_every, "keep_checkpoints": len(eval_steps(p)) + 1})


def eval_steps(p: PPOSweepConfig) -> list[int]:
    return sorted({*range(p.eval_every, p.steps + 1, p.eval_every), p.steps})


def proxy_vs_gold(job: RLHFJob, run_dir: Path, rm: RewardModel, start: dict, beta: float) -> list[dict]:
    """Score each checkpoint of a finished PPO run (step 0 = the SFT start, scored once as `start`); the mean
    KL and train reward over the steps since the previous one come from the run's metrics."""
    p, tok = job.ppo, CharTokenizer()
    held = make_task(job.task).heldout_set(p.eval_prompts)
    rows = [r for r in read_rows(run_dir) if "reward/mean" in r]
    out, prev = [{"step": 0, "beta": beta, **start}], 0
    for step in eval_steps(p):
        model = load_model(run_dir / "checkpoints" / f"step_{step:08d}")
        ev = gold_vs_proxy(model, rm, tok, held, p.k, p.temperature, p.max_tokens, seed=job.run.seed)
        kls = [r.get("kl/mean", 0.0) for r in rows if prev < r["step"] <= step]
        train = [r["reward/mean"] for r in rows if r["step"] == step]
        out.append({"step": step, "beta": beta, **ev, "kl/mean": sum(kls) / max(1, len(kls)),
                    "reward/train": train[0] if train else 0.0})
        print(f"[rlhf] beta={beta:g} step {step:3d}  rm {ev['rm/score']:+.3f}  gold {ev['gold/score']:.3f}  "
              f"correct {ev['gold/correct']:.3f}  concise {ev['gold/concise']:.3f}  "
              f"len {ev['response/len_mean']:.1f}  kl {out[-1]['kl/mean']:.3f}", flush=True)
        prev = step
    return out


def plot(results: dict[float, list[dict]], path: Path) -> Path:
    with figure(path, size=(10, 3.8), ncols=2, dpi=120) as axes:
        for beta, rows in results.items():
            steps = [r["step"] for r in rows]
            axes[0].plot(steps, [r["rm/score"] for r in rows], marker="o", label=f"β = {beta:g}")
            axes[1].plot(steps, [r["gold/score"] for r in rows], marker="o", label=f"β = {beta:g}")
        axes[0].set_title("proxy: reward-model score r̂ (held-out samples)")
        axes[1].set_title("gold: hidden human score (same samples)")
        for ax in axes:
            ax.set_xlabel("PPO step")
            ax.legend()
    return path


def write_page(results: dict[float, list[dict]], rm_final: dict, argv: list[str], job: RLHFJob,
               docs: Path) -> Path:
    """docs/rlhf.md + docs/rlhf_overoptimisation.png from a finished sweep."""
    png = plot(results, docs / "rlhf_overoptimisation.png")
    lines = ["# RLHF on the toy: a reward model, PPO against it, and over-optimisation", "",
             f"**Machine.** {machine()}; accuracies move with the CPU (its MKL kernels change float results), "
             "so read the differences, not the third digit.", "",
             "Lesson 15's three stages on the arithmetic task, with a hidden \"human\" whose taste the policy "
             "never sees:",
             "right and concise (`12#`, gold 2) ≻ right and worked (`3+4=7,7+5=12#`, gold 1) ≻ wrong (gold 0).", "",
             "```bash", "python examples/rlhf.py " + " ".join(argv) + " --write-docs", "```", "",
             (f"1. **SFT** ({job.sft.steps} steps, each demonstration concise with probability {job.sft.p_direct:g}, "
             "else worked) so the policy samples both styles."),
             (f"2. **RM**: Bradley–Terry on {rm_final['pairs/train']} pairs of the SFT policy's own samples "
             f"(k = {job.rm.pairs.k} per prompt, labelled by the hidden human), trunk initialised from the SFT model, "
             f"{job.rm.steps} steps. Held-out pairs ({rm_final['pairs/heldout']}, from held-out prompts): accuracy "
             f"**{rm_final['rm/pair_acc_heldout']:.3f}**, mean gap r̂_w − r̂_l {rm_final['rm/score_gap_heldout']:.2f} "
             f"(median |gap| {rm_final['rm/abs_gap_median_heldout']:.2f}; healthy is 0.5–4)."),
             (f"3. **PPO** against the RM (`env.name=reward_model`), {job.ppo.steps} steps of "
             f"{job.ppo.prompts_per_step} prompts × k = {job.ppo.k}, lr {job.ppo.lr:g}, {job.ppo.epochs} epochs × "
             f"{job.ppo.mini_batches} mini-batches, one run per KL β. Every {job.ppo.eval_every} steps, "
             f"{job.ppo.eval_prompts} held-out prompts × {job.ppo.k} samples at temperature "
             f"{job.ppo.temperature:g} are scored by the RM (proxy) and by the hidden human (gold)."), "",
             "", "What the RM learned, by kind of held-out pair:", "",
             "| held-out pair (chosen ≻ rejected) | pairs | RM accuracy |", "|---|---|---|",
             *[f"| {k} | {n} | {acc:.3f} |" for k, n, acc in rm_final["by_kind"]], "",
             f"![proxy vs gold]({png.name})", "",
             "| β | RM score start → end | gold start → end (best) | right | concise | mean KL last interval |",
             "|---|---|---|---|---|---|"]
    for beta, rows in results.items():
        a, z = rows[0], rows[-1]
        best = max(rows, key=lambda r: r["gold/score"])
        lines.append(f"| {beta:g} | {a['rm/score']:+.3f} → {z['rm/score']:+.3f} | {a['gold/score']:.3f} → "
                     f"{z['gold/score']:.3f} ({best['gold/score']:.3f} at step {best['step']}) | "
                     f"{a['gold/correct']:.3f} → {z['gold/correct']:.3f} | {a['gold/concise']:.3f} → "
                     f"{z['gold/concise']:.3f} | {z.get('kl/mean', 0.0):.4f} |")
    hi, lo = max(results), min(results)
    a_hi, z_hi, z_lo = results[hi][0], results[hi][-1], results[lo][-1]
    lines += ["", (f"Reading it: with β = {hi:g} the RM score rose {a_hi['rm/score']:+.3f} → {z_hi['rm/score']:+.3f} "
                   f"while the gold score went {a_hi['gold/score']:.3f} → {z_hi['gold/score']:.3f}; with β = {lo:g} "
                   f"the RM score rose further, to {z_lo['rm/score']:+.3f}, while gold fell to "
                   f"{z_lo['gold/score']:.3f} (right answers {a_hi['gold/correct']:.3f} → {z_lo['gold/correct']:.3f}). "
                   "The pair table says why: the RM learned the style, which is easy to read off the text, far "
                   "better than correctness, which takes arithmetic; where its accuracy on a kind of pair is below "
                   "0.5 it prefers the wrong answer. PPO climbs the RM by the cheapest route, answering concisely "
                   "whether or not it can, and only the KL term holds it near the SFT policy, on whose samples the "
                   "RM was trained.")]
    lines += ["", ("Over-optimisation (Gao et al. 2022) is the proxy still rising while the gold flattens or falls; "
              "the KL term is the leash that keeps the policy where the RM was trained (lesson 15). "
              "Raw numbers per evaluation: `sweep.json` in the run folder."), ""]
    page = docs / "rlhf.md"
    page.write_text("\n".join(lines))
    return page


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {a for a in argv if a.startswith("--")}
    if flags - {"--write-docs", "--report-only"}:
        sys.exit(f"unknown flag(s) {sorted(flags - {'--write-docs', '--report-only'})}: "
                 "give a recipe, key=value overrides, --write-docs, --report-only")
    argv = [a for a in argv if a not in flags]
    path = argv[0] if argv and "=" not in argv[0] else None
    job = load_config(RLHFJob, path, argv[1:] if path else argv)
    root = Path(job.run.out_dir) / job.run.name
    if "--report-only" in flags:   # the page from a finished sweep's sweep.json, nothing rerun
        done = json.loads((root / "sweep.json").read_text())
        results = {float(b): rows for b, rows in done["runs"].items()}
        print(f"[rlhf] page: {write_page(results, done['rm'], argv, job, DOCS)}")
        return 0
    t0 = time.perf_counter()
    sft_ck = sft_stage(job, root)
    print(f"[rlhf] SFT (both styles): {sft_ck}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    rm_dir = rm_stage(job, root, sft_ck)
    rm_final = rm_summary(rm_dir, job.model.max_seq_len)
    print(f"[rlhf] RM: held-out pair accuracy {rm_final['rm/pair_acc_heldout']:.3f}, mean gap "
          f"{rm_final['rm/score_gap_heldout']:.2f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    p, tok, rm = job.ppo, CharTokenizer(), load_reward_model(rm_dir)
    start = gold_vs_proxy(load_model(sft_ck), rm, tok, make_task(job.task).heldout_set(p.eval_prompts), p.k,
                          p.temperature, p.max_tokens, seed=job.run.seed)
    results = {}
    for beta in p.betas:
        t = time.perf_counter()
        tj = ppo_job(job, root, sft_ck, rm_dir, beta)
        run_dir = Path(tj.run.out_dir) / tj.run.name
        run_stage(f"PPO beta={beta:g}", run_dir, tj.steps, lambda resume, tj=tj: run_train(tj, resume=resume))
        results[beta] = proxy_vs_gold(job, run_dir, rm, start, beta)
        print(f"[rlhf] beta={beta:g} done in {time.perf_counter() - t:.0f} s", flush=True)
    (root / "sweep.json").write_text(json.dumps({"rm": rm_final, "runs": {str(b): r for b, r in results.items()}},
                                                indent=1))
    png = plot(results, root / "rlhf_overoptimisation.png")
    print(f"[rlhf] sweep: {root / 'sweep.json'}  plot: {png}")
    if "--write-docs" in flags:
        print(f"[rlhf] page: {write_page(results, rm_final, argv, job, DOCS)}")
    print(json.dumps({"rlhf": {f"beta={b:g}": {"rm_start": r[0]["rm/score"], "rm_end": r[-1]["rm/score"],
                                               "gold_start": r[0]["gold/score"], "gold_end": r[-1]["gold/score"],
                                               "gold_best": max(x["gold/score"] for x in r)}
                               for b, r in results.items()},
                      "rm": {k: v for k, v in rm_final.items() if k != "by_kind"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
