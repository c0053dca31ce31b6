"""RLHF on the toy, end to end (lesson 15): a hidden "human" -> a reward model -> PPO against it, over β.

    1 SFT    demonstrations in both styles: `12#` (concise) and `3+4=7,7+5=12#` (worked), half each
    2 RM     Bradley–Terry on pairs of the SFT policy's own samples, labelled by the hidden human:
             right and concise (2) ≻ right and verbose (1) ≻ wrong (0)        (reward_model.human_score)
    3 PPO    max E[r̂(x, y)] − β·KL(π‖π_SFT) for each β in the sweep, policy and anchor = π_SFT

The human is hidden from the policy: PPO sees only r̂. Every `eval_every` steps, each run samples
held-out prompts at the rollout temperature and records the mean RM score r̂ next to the mean *gold*
(human) score of the same samples. Over-optimisation (Gao et al. 2022) is r̂ still rising while gold
flattens or falls: the policy finds what the RM over-rewards off the distribution it was trained on,
and the smaller β, the further it is free to go (spec part 2 §8.3: the KL is the off-distribution
defence). Results: `docs/rlhf.md`, plot `docs/rlhf_overoptimisation.png`.

    python -m rlpt.demos.rlhf recipes/rlhf_arith.yaml [key=value ...] [--write-docs]   (run.threads=1 on a shared box)

Each stage reuses a finished folder (runs/<run.name>/sft, rm), so a rerun redoes only the PPO sweep.
`--write-docs` (re)writes docs/rlhf.md and docs/rlhf_overoptimisation.png from the sweep; `--report-only`
writes them from a finished sweep's sweep.json without running anything.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
from pydantic import Field

from rlpt.config import (
    ModelConfig,
    OptimConfig,
    RunConfig,
    Section,
    SFTJob,
    TaskConfig,
    load_config,
)
from rlpt.gpt_mini.generate import SamplingParams, generate
from rlpt.gpt_mini.model import make_model
from rlpt.optim import make_optimizer
from rlpt.gpt_mini.task import make_task
from rlpt.sft import sft_batch, sft_loss
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.report import figure
from rlpt.preference.reward_model import (
    RMConfig,
    RMJob,
    human_score,
    is_concise,
    train_rm,
)
from rlpt.run import Run, latest_checkpoint


class MixedSFTConfig(Section):
    steps: int = Field(400, ge=1)
    batch_size: int = Field(64, ge=2)
    p_direct: float = Field(0.5, ge=0, le=1, description="share of concise (`12#`) demonstrations")
    optim: OptimConfig = OptimConfig(lr=3e-3, warmup_steps=50)


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
    rm: RMConfig = RMConfig(steps=300)
    ppo: PPOSweepConfig = PPOSweepConfig()


# -- stage 1: SFT on both styles ------------------------------------------------------------------------------
def train_mixed_sft(job: RLHFJob, out: Path) -> Path:
    """SFT whose demonstrations are concise with probability p_direct, else worked: the policy then
    samples both styles, so the RM sees both and PPO can move between them. Reuses a finished run."""
    ck = latest_checkpoint(out)
    if ck is not None:
        return ck
    tok, task, cfg = CharTokenizer(), make_task(job.task), job.sft
    sft_job = SFTJob(run=job.run.model_copy(update={"out_dir": str(out.parent), "name": out.name}),
                     model=job.model, task=job.task)
    run = Run(out.parent, out.name, sft_job)
    torch.manual_seed(job.run.seed)
    model = make_model(job.model, tok)
    opt, sched = make_optimizer(model, cfg.optim, cfg.steps)
    rng = random.Random(job.run.seed)
    for step in range(cfg.steps):
        probs = [task.sample(rng, "train") for _ in range(cfg.batch_size)]
        is_direct = [rng.random() < cfg.p_direct for _ in probs]
        direct = [p for p, d in zip(probs, is_direct) if d]
        cot = [p for p, d in zip(probs, is_direct) if not d]
        loss = sum(len(ps) / len(probs) * sft_loss(model, *sft_batch(ps, f, tok))
                   for ps, f in ((direct, "direct"), (cot, "cot")) if ps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            run.log(step + 1, {"loss/sft": loss.item()})
    run.save(cfg.steps, model, model.cfg.to_dict(), {"step": cfg.steps})
    run.close()
    return latest_checkpoint(out)


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


def run_ppo(job: RLHFJob, sft_ck: Path, rm_dir: Path, beta: float, out_dir: Path) -> list[dict]:
    from rlpt.train import TrainJob, build
    p = job.ppo
    tj = load_config(TrainJob, None, [], base={
        "run": {**job.run.model_dump(), "name": f"ppo_beta{beta:g}", "out_dir": str(out_dir)},
        "model": job.model.model_dump(), "task": job.task.model_dump(),
        "env": {"name": "reward_model", "model_path": str(rm_dir)}, "init_from": str(sft_ck),
        "rollout": {"k": p.k, "prompts_per_step": p.prompts_per_step, "temperature": p.temperature,
                    "max_tokens": p.max_tokens},
        "algorithm": {"name": "ppo", "beta": beta},
        "trainer": {"optim": {"lr": p.lr, "warmup_steps": 0, "schedule": "constant"}, "epochs": p.epochs,
                    "mini_batches": p.mini_batches},
        "steps": p.steps})
    torch.manual_seed(job.run.seed)
    run = Run(out_dir, tj.run.name, tj)
    ctl, _ = build(tj, sft_ck)
    tok, rm = ctl.rollout.tokenizer, ctl.env.rm
    held = make_task(job.task).heldout_set(p.eval_prompts)
    rows = []

    def evaluate(step: int, extra: dict) -> None:
        ev = gold_vs_proxy(ctl.trainer.model, rm, tok, held, p.k, p.temperature, p.max_tokens, seed=job.run.seed)
        row = {"step": step, "beta": beta, **ev, **extra}
        rows.append(row)
        run.log(step, {k: v for k, v in row.items() if k != "step"})
        print(f"[rlhf] beta={beta:g} step {step:3d}  rm {ev['rm/score']:+.3f}  gold {ev['gold/score']:.3f}  "
              f"correct {ev['gold/correct']:.3f}  concise {ev['gold/concise']:.3f}  len {ev['response/len_mean']:.1f}"
              + (f"  kl {extra['kl/mean']:.3f}" if "kl/mean" in extra else ""), flush=True)

    evaluate(0, {})
    kls = []
    for step in range(1, p.steps + 1):
        m = ctl.step()
        kls.append(m.get("kl/mean", 0.0))
        if step % p.eval_every == 0 or step == p.steps:
            evaluate(step, {"kl/mean": sum(kls) / len(kls), "reward/train": m.get("reward/mean", 0.0)})
            kls = []
    run.close()
    return rows


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


@torch.no_grad()
def pair_breakdown(rm_dir: Path, max_seq_len: int) -> list[tuple[str, int, float]]:
    """RM accuracy on the held-out pairs by kind (gold of chosen vs rejected): what the RM really learned."""
    from collections import defaultdict

    from rlpt.gpt_mini.task import parse_prompt
    from rlpt.preference.data import collate_pairs, load_pairs
    from rlpt.preference.reward_model import load_reward_model
    tok = CharTokenizer()
    rm = load_reward_model(rm_dir, tok)
    pairs, _ = load_pairs(rm_dir / "pairs_heldout.jsonl", tok, max_seq_len)
    b = collate_pairs(pairs, tok)
    s = rm(b.ids)
    kinds = defaultdict(list)
    names = {2.0: "right, concise", 1.0: "right, worked", 0.0: "wrong"}
    for p, g in zip(pairs, (s[:b.n] - s[b.n:]).tolist()):
        gold = parse_prompt(p.prompt).gold
        kinds[(human_score(p.chosen, gold), human_score(p.rejected, gold))].append(g > 0)
    return [(f"{names[c]} ≻ {names[r]}", len(v), sum(v) / len(v)) for (c, r), v in sorted(kinds.items(), reverse=True)]


def write_page(results: dict[float, list[dict]], rm_final: dict, argv: list[str], job: RLHFJob,
               docs: Path) -> Path:
    """docs/rlhf.md + docs/rlhf_overoptimisation.png from a finished sweep."""
    png = plot(results, docs / "rlhf_overoptimisation.png")
    lines = ["# RLHF on the toy: a reward model, PPO against it, and over-optimisation", "",
             "Lesson 15's three stages on the arithmetic task, with a hidden \"human\" whose taste the policy never sees:",
             "right and concise (`12#`, gold 2) ≻ right and worked (`3+4=7,7+5=12#`, gold 1) ≻ wrong (gold 0).", "",
             "```bash", "python -m rlpt.demos.rlhf " + " ".join(argv) + " --write-docs", "```", "",
             (f"1. **SFT** ({job.sft.steps} steps, half concise and half worked demonstrations) so the policy samples "
             "both styles."),
             (f"2. **RM**: Bradley–Terry on {rm_final['pairs/train']} pairs of the SFT policy's own samples "
             f"(k = {job.rm.pairs.k} per prompt, labelled by the hidden human), trunk initialised from the SFT model, "
             f"{job.rm.steps} steps. Held-out pairs ({rm_final['pairs/heldout']}, from held-out prompts): accuracy "
             f"**{rm_final['rm/pair_acc_heldout']:.3f}**, mean gap r̂_w − r̂_l {rm_final['rm/score_gap_heldout']:.2f} "
             f"(median |gap| {rm_final['rm/abs_gap_median_heldout']:.2f}; healthy is 0.5–4)."),
             (f"3. **PPO** against the RM (`env.name=reward_model`), {job.ppo.steps} steps of "
             f"{job.ppo.prompts_per_step} prompts × k = {job.ppo.k}, lr {job.ppo.lr:g}, {job.ppo.epochs} epochs × "
             f"{job.ppo.mini_batches} mini-batches, one run per KL β. Every {job.ppo.eval_every} steps, "
             f"{job.ppo.eval_prompts} held-out prompts × {job.ppo.k} samples at temperature {job.ppo.temperature:g} are "
             "scored by the RM (proxy) and by the hidden human (gold)."), "",
             "", "What the RM learned, by kind of held-out pair:", "",
             "| held-out pair (chosen ≻ rejected) | pairs | RM accuracy |", "|---|---|---|",
             *[f"| {k} | {n} | {acc:.3f} |" for k, n, acc in pair_breakdown(
                 Path(job.run.out_dir) / job.run.name / "rm", job.model.max_seq_len)], "",
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
              "the KL term is the leash that keeps the policy where the RM was trained (spec part 2 §8.3). "
              "Raw numbers per evaluation: `sweep.json` in the run folder."), ""]
    page = docs / "rlhf.md"
    page.write_text("\n".join(lines))
    return page


def main(argv: list[str] | None = None) -> int:
    from rlpt.cli import _split_args
    argv = list(sys.argv[1:] if argv is None else argv)
    write_docs, report_only = "--write-docs" in argv, "--report-only" in argv
    argv = [a for a in argv if a not in ("--write-docs", "--report-only")]
    path, overrides = _split_args(argv)
    job = load_config(RLHFJob, path, overrides)
    docs = Path(__file__).resolve().parents[2] / "docs"
    if report_only:   # the page from a finished sweep's sweep.json, nothing rerun
        done = json.loads((Path(job.run.out_dir) / job.run.name / "sweep.json").read_text())
        results = {float(b): rows for b, rows in done["runs"].items()}
        print(f"[rlhf] page: {write_page(results, done['rm'], argv, job, docs)}")
        return 0
    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    root = Path(job.run.out_dir) / job.run.name
    t0 = time.perf_counter()
    sft_ck = train_mixed_sft(job, root / "sft")
    print(f"[rlhf] SFT (both styles): {sft_ck}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    rm_dir = root / "rm"
    if latest_checkpoint(rm_dir) is None:
        rm_job = RMJob(run=job.run.model_copy(update={"out_dir": str(root), "name": "rm"}), model=job.model,
                       task=job.task, init_from=str(sft_ck),
                       rm=job.rm.model_copy(update={"pairs": job.rm.pairs.model_copy(update={"preference": "human"})}))
        _, _, rm_final = train_rm(rm_job)
        (root / "rm_final.json").write_text(json.dumps(rm_final, indent=1))
    rm_final = json.loads((root / "rm_final.json").read_text())
    print(f"[rlhf] RM: held-out pair accuracy {rm_final['rm/pair_acc_heldout']:.3f}, mean gap "
          f"{rm_final['rm/score_gap_heldout']:.2f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    results = {}
    for beta in job.ppo.betas:
        t = time.perf_counter()
        results[beta] = run_ppo(job, sft_ck, rm_dir, beta, root)
        print(f"[rlhf] beta={beta:g} done in {time.perf_counter() - t:.0f} s", flush=True)
    (root / "sweep.json").write_text(json.dumps({"rm": rm_final, "runs": {str(b): r for b, r in results.items()}},
                                                indent=1))
    png = plot(results, root / "rlhf_overoptimisation.png")
    print(f"[rlhf] sweep: {root / 'sweep.json'}  plot: {png}")
    if write_docs:
        print(f"[rlhf] page: {write_page(results, rm_final, argv, job, docs)}")
    print(json.dumps({"rlhf": {f"beta={b:g}": {"rm_start": r[0]["rm/score"], "rm_end": r[-1]["rm/score"],
                                               "gold_start": r[0]["gold/score"], "gold_end": r[-1]["gold/score"],
                                               "gold_best": max(x["gold/score"] for x in r)}
                               for b, r in results.items()}, "rm": rm_final}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
