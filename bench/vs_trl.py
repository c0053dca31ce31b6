"""rlpt against TRL at the same work, in one process: a GRPO step (β = 0 and β > 0) and a DPO step (batch 8, 64).

    GRPO step = sample B×K (T = 1, ≤ max_tokens) + verify + [π_ref forward if β > 0] + fwd/bwd/AdamW + sync
    DPO step  = policy forward over [chosen; rejected] + π_ref forward (both sides) + DPO loss + bwd/AdamW
    ratio     = median TRL step / median rlpt step   (> 1: rlpt is faster)

Both sides start from the same gpt_mini SFT weights: rlpt trains them as gpt_mini, TRL 1.16 as the
`LlamaForCausalLM` `rlpt.models.hf.gpt_mini_to_hf` makes of them (equal logits to 1e-5), with the
character tokenizer as a `PreTrainedTokenizerFast` (`rlpt.models.export.char_tokenizer_to_hf`, the same ids).
Same prompts (the arithmetic task's train split; rlpt's env draws them, TRL's dataset is a list of them),
the same verifier (TRL's reward function decodes the completion ids with gpt_mini's tokenizer and calls the
task's `verify`), the same shapes (B prompts × K samples, max_tokens, T = 1, no top-k/top-p), the same loss
(GRPO's clipped surrogate, seq-mean-token-mean = TRL's loss_type="grpo", group std scaling, k3 KL at β),
the same optimizer (AdamW lr, betas 0.9/0.95, wd 0, clip 1.0, constant schedule) and mini-batches.

Rounds alternate: TRL's trainer runs its own loop and, after each of its GRPO (or DPO) steps, a callback
runs one step of every rlpt side (their order flipped every step), so load drift on the shared machine hits
all sides alike; the first `--warmup` steps of every side are dropped; medians are kept. TRL's step is the
wall time between two callbacks (its data loading, logging and metrics count, as rlpt's do). Each step's
process CPU time is kept beside its wall time: with one torch thread it is the cost of the step itself,
much less moved by other jobs on a shared machine than wall time is (the `cpu` columns, `*_cpu` in the JSON).

Where the time goes: rlpt's per-role `time/*` from the controller's metrics (rollout, verify, ref, train,
sync); TRL's by wrapping its methods: `_generate_single_turn` (generate), the reward function (verify),
`_get_per_token_logps_and_entropies` under no_grad (ref: π_ref at β > 0, and π_old when TRL scores it);
TRL's "train" is the rest of its step (collate, advantages, fwd/bwd/AdamW, its metrics).

The work must match, and is checked: mean sampled length and mean reward (same distribution, the policies
start equal, so they agree to sampling noise), and rows trained. rlpt drops groups whose K rewards are all
equal (zero advantage, zero gradient); TRL trains every row. The side `rlpt_all` is rlpt with that drop
undone (degenerate flags cleared after the advantages, so those rows train with A = 0, as in TRL): the
equal-rows comparison.

The ceilings (GRPO): on a batch `rlpt_all` trained, fwd + bwd of the log-probs in fp32, under bf16 autocast,
and on a dense batch of the same non-pad tokens (the FLOPs sequence packing would spend), alternating, CPU
time; then TRL's step over rlpt_all's with its train time divided by those factors, and with a free rollout:
what each lever could buy at most on this CPU (docs/performance.md).

The curve (`--curve S`): held-out greedy accuracy against each side's own training clock from the same SFT
start at the recipe's rollout / loss settings (fp32), interleaved, the same evaluator, `--curve-evals` evaluations
per side (the grid that resolves the time to a target); `--curve-seeds`; `--target` (several, comma-separated):
the first clock reading at which accuracy reached it (window 1) and at which the mean of 3 consecutive
evaluations up to it did (windows 3 and 5: a crossing that holds, not one evaluation's ±0.035 noise on 200 problems),
TRL's over rlpt's per seed and the median over seeds.

`--precision bf16`: GRPO with each side's best CPU setting (rlpt trainer.precision=bf16, TRL bf16=True: CPU
autocast, fp32 master weights on both); the samplers stay fp32. The JSON records the precision, the CPU's
bf16 flags and the load average at the start and the end (this machine is shared).

    python bench/vs_trl.py                       # SFT start (~50 s CPU) + GRPO β 0 / 0.04 + DPO 8 / 64; JSON last
    python bench/vs_trl.py --init runs/x/sft/checkpoints/step_00000180 --steps 20 --only grpo
    python bench/vs_trl.py --init <ckpt> --only grpo --precision bf16     # best vs best (bf16 autocast both)
    python bench/vs_trl.py --only none --curve 180 --curve-seeds 0,1,2    # accuracy against wall-clock only
    python bench/vs_trl.py --init <ckpt> --only grpo --threads 2          # both sides on 2 torch threads (wall)
    python bench/vs_trl.py --init <ckpt> --only grpo --rlpt-precision bf16  # rlpt bf16 against TRL fp32 (its best)

Needs `pip install rlpt[peers]` (trl==1.16.0) and `rlpt[hf]`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

from rlpt.gpt_mini.task import verify  # noqa: E402
from rlpt.gpt_mini.tokenizer import CharTokenizer  # noqa: E402

ROLES = ("rollout", "verify", "ref", "train", "sync")     # rlpt's controller timings, time/<role>
TRL_PHASES = ("generate", "verify", "ref", "train")       # TRL's, train = the rest of the step


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", default=None, help="an rlpt SFT checkpoint; default: train one now (--sft-steps)")
    p.add_argument("--sft-steps", type=int, default=180, help="the recipe's SFT start (grpo_arith's sft: section)")
    p.add_argument("--only", choices=["grpo", "dpo", "all", "none"], default="all",
                   help="which step benchmarks to run (none: only --curve)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--betas", default="0,0.04", help="GRPO β settings, comma-separated")
    p.add_argument("--mini-batches", type=int, default=1,
                   help="optimizer steps per rollout batch, both sides (TRL: steps_per_generation; at > 1 TRL adds "
                        "a π_old forward that rlpt takes from the sampler)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="GRPO's training precision on both sides: fp32 (the same-work comparison) or bf16 = each "
                        "side's best CPU setting: rlpt trainer.precision=bf16 (autocast, fp32 master weights), "
                        "TRL bf16=True (the same autocast through accelerate); the samplers stay fp32 (the engine's "
                        "bf16 path is slower on this CPU: docs/engine.md)")
    p.add_argument("--rlpt-precision", choices=["fp32", "bf16"], default=None,
                   help="rlpt's GRPO training precision when it differs from TRL's (default: --precision): "
                        "`--precision fp32 --rlpt-precision bf16` is best against best on a CPU where TRL's bf16 is "
                        "slower than its fp32 (this one: docs/performance.md), in one process")
    p.add_argument("--no-packing", dest="packing", action="store_false",
                   help="rlpt's trainer, reference and DPO padded (trainer.packing / dpo packing off): the control")
    p.add_argument("--dpo-batches", default="8,64", help="DPO pairs per step, comma-separated")
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    p.add_argument("--steps", type=int, default=12, help="timed steps per side")
    p.add_argument("--curve", type=float, default=0.0, help="seconds of training per side for the held-out "
                                                            "accuracy curve (0: skip)")
    p.add_argument("--curve-seeds", default="0", help="seeds of the curve runs (the SFT start is shared)")
    p.add_argument("--curve-clock", choices=["cpu", "wall"], default="cpu",
                   help="each side's training clock: this process's CPU time in its steps (1 thread: the work itself, "
                        "barely moved by other jobs on a shared machine) or wall time")
    p.add_argument("--curve-evals", type=int, default=36,
                   help="held-out evaluations per side over --curve seconds (the grid that resolves time to target)")
    p.add_argument("--heldout", type=int, default=200,
                   help="held-out problems per evaluation of the curve (one evaluation's standard error ~ "
                        "sqrt(p(1-p)/n): 0.035 at 200, 0.02 at 600)")
    p.add_argument("--target", default="0.6,0.62,0.64", help="held-out accuracies whose first crossing is timed, "
                                                             "comma-separated (the first is the headline)")
    p.add_argument("--plot", default="docs/img/perf_heldout_vs_wallclock.png")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for every side (one process: TRL and rlpt alike). 1 (default): CPU time is the "
                        "step's own cost, the steady ratio on a shared machine; 2 on this 2-core machine: each side's "
                        "best wall time (read the wall ratio then, CPU time counts both threads)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------- the shared start

def sft_start(args, tmp: Path) -> tuple[Path, float]:
    """The recipe's SFT start (rlpt), trained now unless --init names one; -> (checkpoint, seconds)."""
    if args.init:
        return Path(args.init), 0.0
    from rlpt.train import load_train_job, sft_init
    job = load_train_job("recipes/grpo_arith.yaml", [f"run.out_dir={tmp}", "run.name=start", "run.progress=false",
                                                      f"sft.steps={args.sft_steps}", f"run.seed={args.seed}"])
    t = time.perf_counter()
    ckpt = sft_init(job, resume=False)
    return ckpt, time.perf_counter() - t


def export_hf(ckpt: Path, out: Path) -> Path:
    """The SFT weights as a LlamaForCausalLM directory + the character tokenizer, for TRL to load by path."""
    from rlpt.gpt_mini.model import load_model
    from rlpt.models.export import char_tokenizer_to_hf
    from rlpt.models.hf import gpt_mini_to_hf
    gpt = load_model(ckpt, None, CharTokenizer())
    gpt_mini_to_hf(gpt).save_pretrained(out)
    char_tokenizer_to_hf().save_pretrained(out)
    return out


# ---------------------------------------------------------------- GRPO

def rlpt_grpo(args, ckpt: Path, beta: float, all_rows: bool, **settings):
    """rlpt's controller at the bench's shapes (`settings` override them: prompts, temperature, mini_batches);
    `all_rows`: degenerate groups trained too (A = 0), as TRL does."""
    from rlpt.train import build, load_train_job
    s = {"prompts": args.prompts, "temperature": 1.0, "mini_batches": args.mini_batches} | settings
    job = load_train_job("recipes/grpo_arith.yaml", [
        f"init_from={ckpt}", f"rollout.prompts_per_step={s['prompts']}", f"rollout.k={args.k}",
        f"rollout.max_tokens={args.max_tokens}", f"rollout.temperature={s['temperature']}", f"algorithm.beta={beta}",
        f"trainer.mini_batches={s['mini_batches']}", f"trainer.optim.lr={args.lr}",
        "trainer.optim.schedule=constant", "trainer.optim.warmup_steps=0", "steps=100000",
        f"eval.size={args.heldout}",
        f"trainer.packing={str(args.packing).lower()}",
        f"trainer.precision={s.get('precision', args.rlpt_precision or args.precision)}",
        "run.progress=false", f"run.seed={args.seed}"])
    ctl, heldout = build(job, ckpt)
    train_step = ctl.trainer.train_step

    def seen(batch, loss_fn):        # the batch the trainer got: its padding share, and kept for the ceilings
        ctl.last_batch = batch.input_ids
        return train_step(batch, loss_fn)
    ctl.trainer.train_step, ctl.last_batch = seen, None
    if all_rows:
        original = ctl.algorithm.compute_advantages

        def keep_all(groups):
            original(groups)
            for g in groups:
                for t in g:
                    t.degenerate = False      # A stays 0: the row trains with no gradient signal, as in TRL
        ctl.algorithm.compute_advantages = keep_all
    return ctl, heldout


def rlpt_step(ctl) -> dict:
    """One controller step -> its wall time, role timings, and the work it did."""
    t, c = time.perf_counter(), time.process_time()
    m = ctl.step()
    out = {"total": time.perf_counter() - t, "cpu": time.process_time() - c,
           **{r: m.get(f"time/{r}", 0.0) for r in ROLES}}
    rows = ctl.rollout.prompts_per_step * ctl.k
    out |= {"len": m["response/len_mean"], "reward": m["reward/mean"],
            "rows": rows * m["groups/kept"] if not m["step/skipped"] else 0.0,
            "pad_frac": float((ctl.last_batch == ctl.pad_id).float().mean()) if ctl.last_batch is not None else 0.0}
    return out


def prompt_rows(args, n: int, seed: int) -> list[dict]:
    """n train-split prompts of the arithmetic task (what rlpt's env draws), as TRL dataset rows."""
    from rlpt.config import TaskConfig
    from rlpt.framework.environment import ArithmeticEnv
    from rlpt.gpt_mini.task import make_task
    from rlpt.train import load_train_job
    task_cfg = load_train_job("recipes/grpo_arith.yaml", []).task
    env = ArithmeticEnv(make_task(TaskConfig(**task_cfg.model_dump())), seed=seed)
    return [{"prompt": (p := env.reset("train")).text, "gold": p.gold} for _ in range(n)]


class TRLProbe:
    """TRL's phases, by wrapping its methods on the trainer instance; `take()` returns and resets them."""

    def __init__(self):
        self.t = dict.fromkeys(TRL_PHASES, 0.0)
        self.work = []   # (length, reward) of every completion scored

    def attach(self, trainer) -> None:
        gen, score = trainer._generate_single_turn, trainer._get_per_token_logps_and_entropies

        def timed_gen(*a, **k):
            t0 = time.perf_counter()
            try:
                return gen(*a, **k)
            finally:
                self.t["generate"] += time.perf_counter() - t0

        def timed_score(*a, **k):
            if torch.is_grad_enabled():       # the training forward: part of "train"
                return score(*a, **k)
            t0 = time.perf_counter()
            try:
                return score(*a, **k)
            finally:
                self.t["ref"] += time.perf_counter() - t0
        trainer._generate_single_turn, trainer._get_per_token_logps_and_entropies = timed_gen, timed_score

    def reward_fn(self):
        tok = CharTokenizer()

        def arithmetic_reward(prompts, completions, completion_ids, gold, **_):
            t0 = time.perf_counter()
            rewards = [verify(tok.decode(ids), g) for ids, g in zip(completion_ids, gold)]
            self.work += [(len(ids), r) for ids, r in zip(completion_ids, rewards)]
            self.t["verify"] += time.perf_counter() - t0
            return rewards
        return arithmetic_reward

    def take(self, total: float) -> dict:
        out = {**self.t, "total": total}
        out["train"] = total - self.t["generate"] - self.t["verify"] - self.t["ref"]
        n = len(self.work) or 1
        out |= {"len": sum(x for x, _ in self.work) / n, "reward": sum(r for _, r in self.work) / n,
                "rows": float(len(self.work))}
        self.t, self.work = dict.fromkeys(TRL_PHASES, 0.0), []
        return out


def interleaver(per_step: int, sides: dict, record: dict, probe: TRLProbe | None = None, take=None):
    """A TrainerCallback: after every `per_step` TRL optimizer steps (one GRPO/DPO step), record TRL's step and
    run one step of each rlpt side, order flipped each time."""
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % per_step:
                return
            total, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
            record["trl"].append({**(probe.take(total) if probe else take(total)), "cpu": cpu})
            names = list(sides) if len(record["trl"]) % 2 else list(sides)[::-1]
            for name in names:
                record[name].append(sides[name]())
            self.t0, self.c0 = time.perf_counter(), time.process_time()
    return Interleave()


def bench_grpo(args, ckpt: Path, hf_dir: Path, beta: float, tmp: Path) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    n_steps = args.warmup + args.steps
    rows = args.prompts * args.k
    cfg = GRPOConfig(
        output_dir=str(tmp / f"trl_grpo_{beta}"), per_device_train_batch_size=rows // args.mini_batches,
        steps_per_generation=args.mini_batches, num_generations=args.k, max_completion_length=args.max_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=beta, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        num_iterations=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9,
        adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, max_steps=n_steps * args.mini_batches,
        gradient_accumulation_steps=1, logging_steps=10 ** 6, save_strategy="no", report_to="none", use_cpu=True,
        seed=args.seed, disable_dropout=True, log_completions=False, mask_truncated_completions=False,
        dataloader_num_workers=0, bf16=args.precision == "bf16", fp16=False, model_init_kwargs={"dtype": "float32"})
    data = Dataset.from_list(prompt_rows(args, args.prompts * (n_steps + 2), args.seed))
    probe = TRLProbe()
    trainer = GRPOTrainer(model=str(hf_dir), reward_funcs=[probe.reward_fn()], args=cfg, train_dataset=data,
                          processing_class=_hf_tokenizer(hf_dir))
    probe.attach(trainer)
    _silence(trainer)
    ctls = {"rlpt": rlpt_grpo(args, ckpt, beta, all_rows=False)[0],
            "rlpt_all": rlpt_grpo(args, ckpt, beta, all_rows=True)[0]}
    record = {"trl": [], **{k: [] for k in ctls}}
    sides = {k: (lambda c=c: rlpt_step(c)) for k, c in ctls.items()}
    trainer.add_callback(interleaver(args.mini_batches, sides, record, probe))
    trainer.train()
    out = {k: v[args.warmup:] for k, v in record.items()}
    c = ctls["rlpt_all"]
    out["ceilings"] = ceilings(c.trainer.model, c.last_batch, c.pad_id)
    return out


def _silence(trainer) -> None:
    """No progress bar and no printed log dicts from the HF Trainer loop."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def ceilings(model, ids: torch.Tensor, pad_id: int, reps: int = 15) -> dict:
    """What the train role could gain on this CPU, measured on a batch rlpt trained (fwd + bwd of the log-probs):
    fp32 as trained; bf16 autocast (the CPU's AVX-512-BF16 path, if any); and a dense batch holding the same
    non-pad tokens with no padding (the FLOPs sequence packing would spend). Alternating, medians, seconds."""
    from rlpt.framework.trajectory import per_token_logp
    n_tok = int((ids != pad_id).sum())
    width = ids.shape[1]
    packed = ids[ids != pad_id][: (n_tok // width) * width].view(-1, width)   # same tokens, no pad
    model = model.train()

    def fwd_bwd(x, bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = per_token_logp(model, x).float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    cases = {"fp32": (ids, False), "bf16": (ids, True), "fp32_packed": (packed, False)}
    times = {k: [] for k in cases}
    for r in range(reps + 1):
        for k in (list(cases) if r % 2 else list(cases)[::-1]):
            t = time.process_time()                # CPU time: steadier than wall time on a shared machine
            fwd_bwd(*cases[k])
            if r:                                  # round 0 warms up
                times[k].append(time.process_time() - t)
    m = {k: statistics.median(v) for k, v in times.items()}
    return {"rows": ids.shape[0], "width": width, "pad_frac": round(1 - n_tok / ids.numel(), 3),
            **{f"fwd_bwd_{k}_s": round(v, 4) for k, v in m.items()},
            "bf16_speedup": round(m["fp32"] / m["bf16"], 3),
            "packed_speedup": round(m["fp32"] / m["fp32_packed"] * packed.numel() / n_tok, 3)}


def _hf_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)


# ---------------------------------------------------------------- DPO

def bench_dpo(args, ckpt: Path, hf_dir: Path, batch: int, tmp: Path) -> dict:
    """TRL's DPOTrainer (reference model forward every step) against rlpt's DPO step with the reference forward
    every step (bench/dpo_step.py's PrefStep without a precomputed table), `batch` pairs per step."""
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from rlpt.config import OptimConfig
    from rlpt.gpt_mini.model import load_model
    from rlpt.preference.data import collate_pairs
    from rlpt.preference.dpo import DPOConfig
    sys.path.insert(0, str(Path(__file__).parent))
    dpo_step = importlib.import_module("dpo_step")
    n_steps = args.warmup + args.steps
    pairs = dpo_step.fixed_pairs(batch * (n_steps + 2), args.seed)
    tok = CharTokenizer()
    cfg = DPOConfig(method="dpo", beta=args.dpo_beta, batch_size=batch, packing=args.packing,
                    optim=OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant"))
    side = dpo_step.PrefStep(load_model(ckpt, None, tok), cfg, tok, n_steps + 10)
    state = {"i": 0}

    def rlpt_dpo() -> dict:
        part = pairs[state["i"] * batch:(state["i"] + 1) * batch]
        state["i"] += 1
        t, c = time.perf_counter(), time.process_time()
        side(part)
        total, cpu = time.perf_counter() - t, time.process_time() - c
        b = collate_pairs(part, tok)
        return {"total": total, "cpu": cpu, "rows": float(b.ids.shape[0]), "tokens": float((b.ids != tok.pad_id).sum())}

    tcfg = TRLDPOConfig(
        output_dir=str(tmp / f"trl_dpo_{batch}"), per_device_train_batch_size=batch, beta=args.dpo_beta,
        loss_type=["sigmoid"], precompute_ref_log_probs=False, learning_rate=1e-5, lr_scheduler_type="constant",
        warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, max_steps=n_steps,
        gradient_accumulation_steps=1, logging_steps=10 ** 6, save_strategy="no", report_to="none", use_cpu=True,
        seed=args.seed, disable_dropout=True, dataloader_num_workers=0, bf16=False, fp16=False,
        model_init_kwargs={"dtype": "float32"})
    data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
    trainer = DPOTrainer(model=str(hf_dir), args=tcfg, train_dataset=data, processing_class=_hf_tokenizer(hf_dir))
    seen = {"rows": 0.0, "tokens": 0.0}
    compute_loss = trainer.compute_loss

    def counted(model, inputs, *a, **k):          # what TRL trained: rows and non-pad tokens of its batch
        ids = inputs.get("input_ids")
        mask = inputs.get("attention_mask")
        if ids is not None:
            seen["rows"] += float(ids.shape[0])
            seen["tokens"] += float(mask.sum()) if mask is not None else float(ids.numel())
        return compute_loss(model, inputs, *a, **k)
    trainer.compute_loss = counted
    _silence(trainer)

    def take(total: float) -> dict:
        out = {"total": total, **seen}
        seen.update(rows=0.0, tokens=0.0)
        return out
    record = {"trl": [], "rlpt": []}
    trainer.add_callback(interleaver(1, {"rlpt": rlpt_dpo}, record, take=take))
    trainer.train()
    return {k: v[args.warmup:] for k, v in record.items()}


# ---------------------------------------------------------------- held-out accuracy against wall-clock

CURVE = {"prompts": 32, "temperature": 0.7, "mini_batches": 2, "beta": 0.05}   # recipes/grpo_arith.yaml's


def bench_curve(args, ckpt: Path, hf_dir: Path, tmp: Path) -> dict:
    """Held-out greedy accuracy (--heldout problems, 200 by default; the same evaluator for both: TRL's weights go
    back to gpt_mini with hf_to_gpt_mini) against each side's own training wall-clock, from the same SFT start, the
    recipe's rollout / loss settings (constant lr). Interleaved: after each TRL GRPO step, rlpt steps until its clock
    catches up, so load drift hits both; evaluation time is not on either clock."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlpt.framework.evaluate import evaluate
    from rlpt.models.hf import hf_to_gpt_mini
    mb, rows = CURVE["mini_batches"], CURVE["prompts"] * args.k
    ctl, heldout = rlpt_grpo(args, ckpt, CURVE["beta"], all_rows=False, prompts=CURVE["prompts"],
                             temperature=CURVE["temperature"], mini_batches=mb, precision="fp32")
    cfg = GRPOConfig(
        output_dir=str(tmp / "trl_curve"), per_device_train_batch_size=rows // mb, steps_per_generation=mb,
        num_generations=args.k, max_completion_length=args.max_tokens, temperature=CURVE["temperature"], top_p=1.0,
        top_k=0, beta=CURVE["beta"], epsilon=0.2, loss_type="grpo", scale_rewards="group", num_iterations=1,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95,
        weight_decay=0.0, max_grad_norm=1.0, max_steps=10 ** 6, gradient_accumulation_steps=1, logging_steps=10 ** 6,
        save_strategy="no", report_to="none", use_cpu=True, seed=args.seed, disable_dropout=True,
        log_completions=False, mask_truncated_completions=False, dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32"})
    probe = TRLProbe()
    data = Dataset.from_list(prompt_rows(args, 20000, args.seed))
    trainer = GRPOTrainer(model=str(hf_dir), reward_funcs=[probe.reward_fn()], args=cfg, train_dataset=data,
                          processing_class=_hf_tokenizer(hf_dir))
    _silence(trainer)
    every, budget = args.curve / args.curve_evals, args.curve
    now = time.process_time if args.curve_clock == "cpu" else time.perf_counter
    acc0 = evaluate(ctl.trainer.model, ctl.env, heldout, args.max_tokens)["acc"]
    points = {"trl": [(0.0, 0, acc0)], "rlpt": [(0.0, 0, acc0)]}
    clock = {"trl": 0.0, "rlpt": 0.0}
    steps = {"trl": 0, "rlpt": 0}

    def mark(side: str, model) -> None:
        if clock[side] >= every * len(points[side]) or clock[side] >= budget:
            points[side].append((round(clock[side], 1), steps[side],
                                 evaluate(model, ctl.env, heldout, args.max_tokens)["acc"]))

    def rlpt_until(t: float) -> None:
        while clock["rlpt"] < min(t, budget):
            t0 = now()
            ctl.step()
            clock["rlpt"] += now() - t0
            steps["rlpt"] += 1
            mark("rlpt", ctl.trainer.model)

    class Race(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            self.t0 = now()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step % mb:
                return
            clock["trl"] += now() - self.t0
            steps["trl"] += 1
            mark("trl", hf_to_gpt_mini(trainer.model))
            rlpt_until(clock["trl"])
            control.should_training_stop = clock["trl"] >= budget
            self.t0 = now()
    trainer.add_callback(Race())
    trainer.train()
    rlpt_until(budget)
    return {"seconds": budget, "clock": args.curve_clock, "settings": CURVE, "heldout": len(heldout), "points": points,
            "steps_per_s": {k: round(steps[k] / clock[k], 4) for k in steps}}


def time_to(points: list, target: float, window: int = 1) -> float | None:
    """The first clock reading (s) at which held-out accuracy, averaged over the last `window` evaluations up to
    it, reached `target` (window 1: the first crossing; 3, 5: a trailing mean, so one evaluation's noise does not
    count as a crossing and the time is when the crossing could be known); None if it never did."""
    accs = [acc for _, _, acc in points]
    return next((points[i][0] for i in range(window - 1, len(points))
                 if sum(accs[i - window + 1:i + 1]) / window >= target), None)


def speedups(curves: list[dict], targets: list[float]) -> dict:
    """Per target and window: TRL's time to it over rlpt's, per seed (None where a side never got there; a lower
    bound where only rlpt did) and the median over the seeds that both reached."""
    out = {}
    for target in targets:
        for window in (1, 3, 5):
            per = []
            for c in curves:
                t_r, t_t = (time_to(c["points"][k], target, window) for k in ("rlpt", "trl"))
                per.append({"seed": c["seed"], "rlpt_s": t_r, "trl_s": t_t,
                            "trl_over_rlpt": round(t_t / t_r, 2) if t_r and t_t is not None else None,
                            # TRL never got there within the budget: the ratio is at least budget / rlpt's time
                            "trl_over_rlpt_at_least": round(c["seconds"] / t_r, 2) if t_r and t_t is None else None})
            both = [x["trl_over_rlpt"] for x in per if x["trl_over_rlpt"] is not None]
            out[f"{target}/w{window}"] = {"runs": per, "median": statistics.median(both) if both else None}
    return out


def plot_curve(curves: list[dict], path: str, target: float | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for side, colour in (("rlpt", "tab:blue"), ("trl", "tab:orange")):
        rate = statistics.median(c["steps_per_s"][side] for c in curves)
        for i, c in enumerate(curves):       # each evaluation (dots) and the trailing mean of 3 (the line)
            pts = c["points"][side]
            accs = [p[2] for p in pts]
            trail = [sum(accs[max(0, j - 2):j + 1]) / len(accs[max(0, j - 2):j + 1]) for j in range(len(accs))]
            ax.plot([p[0] for p in pts], accs, "o", color=colour, alpha=0.25, markersize=2.5)
            ax.plot([p[0] for p in pts], trail, "-", color=colour, alpha=0.85,
                    label=f"{side} ({rate:.3f} steps/s; line: mean of the last 3 evals)" if i == 0 else None)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target}")
    clock = "CPU time" if curves[0].get("clock") == "cpu" else "wall-clock"
    ax.set_xlabel(f"training {clock}, s (1 thread, evaluation excluded)")
    ax.set_ylabel(f"held-out greedy accuracy ({curves[0]['heldout']})")
    ax.set_title(f"GRPO from one SFT start: rlpt vs TRL 1.16 ({len(curves)} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- report

def med(xs: list[dict], key: str) -> float:
    return statistics.median(x[key] for x in xs) if xs else float("nan")


def mean(xs: list[dict], key: str) -> float:
    return sum(x[key] for x in xs) / len(xs) if xs else float("nan")


def report_grpo(beta: float, rec: dict) -> dict:
    trl, out = rec["trl"], {}
    print(f"\nGRPO step, beta={beta}: median seconds per step over {len(trl)} steps ({torch.get_num_threads()} "
          "torch threads)")
    print(f"| {'side':<9} | {'step':>7} | {'rollout':>7} | {'verify':>6} | {'ref':>6} | {'train':>6} | "
          f"{'sync':>6} | {'TRL/x':>6} | {'cpu s':>6} | {'TRL/x':>5} | {'len':>5} | {'reward':>6} | {'rows':>5} |")
    trl_row = {"generate": med(trl, "generate"), "verify": med(trl, "verify"), "ref": med(trl, "ref"),
               "train": med(trl, "train")}
    print(f"| {'trl':<9} | {med(trl, 'total'):>7.3f} | {trl_row['generate']:>7.3f} | {trl_row['verify']:>6.3f} | "
          f"{trl_row['ref']:>6.3f} | {trl_row['train']:>6.3f} | {'-':>6} | {1.0:>6.2f} | {med(trl, 'cpu'):>6.3f} | "
          f"{1.0:>5.2f} | {mean(trl, 'len'):>5.1f} | {mean(trl, 'reward'):>6.3f} | {mean(trl, 'rows'):>5.1f} |")
    out["trl"] = {"step_s": round(med(trl, "total"), 4), "step_cpu_s": round(med(trl, "cpu"), 4),
                  **{k + "_s": round(v, 4) for k, v in trl_row.items()},
                  "len_mean": round(mean(trl, "len"), 2), "reward_mean": round(mean(trl, "reward"), 3),
                  "rows_mean": round(mean(trl, "rows"), 1)}
    for side in ("rlpt", "rlpt_all"):
        r = rec[side]
        ratio, ratio_cpu = med(trl, "total") / med(r, "total"), med(trl, "cpu") / med(r, "cpu")
        print(f"| {side:<9} | {med(r, 'total'):>7.3f} | {med(r, 'rollout'):>7.3f} | {med(r, 'verify'):>6.3f} | "
              f"{med(r, 'ref'):>6.3f} | {med(r, 'train'):>6.3f} | {med(r, 'sync'):>6.3f} | {ratio:>6.2f} | "
              f"{med(r, 'cpu'):>6.3f} | {ratio_cpu:>5.2f} | {mean(r, 'len'):>5.1f} | {mean(r, 'reward'):>6.3f} | "
              f"{mean(r, 'rows'):>5.1f} |")
        out[side] = {"step_s": round(med(r, "total"), 4), "step_cpu_s": round(med(r, "cpu"), 4),
                     "trl_over_rlpt_cpu": round(ratio_cpu, 3), **{k + "_s": round(med(r, k), 4) for k in ROLES},
                     "len_mean": round(mean(r, "len"), 2), "reward_mean": round(mean(r, "reward"), 3),
                     "rows_mean": round(mean(r, "rows"), 1), "trl_over_rlpt": round(ratio, 3),
                     # the ceiling: rlpt's step without its reference forward, and its train time alone
                     "trl_over_rlpt_no_ref": round(med(trl, "total") / med([{"x": x["total"] - x["ref"]}
                                                                             for x in r], "x"), 3)}
    # ceilings: rlpt_all's step with its train role made faster by what `ceilings` measured (bf16 autocast,
    # no padding; assumed to multiply), and with a free rollout: what each lever could buy at most
    c, r = rec["ceilings"], rec["rlpt_all"]
    step, train, rollout = med(r, "total"), med(r, "train"), med(r, "rollout")
    for name, f in (("packed", c["packed_speedup"]), ("bf16", c["bf16_speedup"]),
                    ("packed_bf16", c["packed_speedup"] * c["bf16_speedup"])):
        c[f"trl_over_rlpt_{name}_est"] = round(med(trl, "total") / (step - train + train / f), 3)
    c["trl_over_rlpt_free_rollout"] = round(med(trl, "total") / (step - rollout), 3)
    c["rlpt_pad_frac_mean"] = round(mean(r, "pad_frac"), 3)
    out["ceilings"] = c
    print(f"ceilings (rlpt_all's trained batch, fwd+bwd): {json.dumps(c)}")
    # the work matches when lengths and rewards agree to sampling noise (64 rows a step, a few % on the mean)
    out["match"] = {"len_rel_gap": round(abs(mean(rec["rlpt_all"], "len") / mean(trl, "len") - 1), 3),
                    "reward_abs_gap": round(abs(mean(rec["rlpt_all"], "reward") - mean(trl, "reward")), 3),
                    "rows_equal_rlpt_all": mean(rec["rlpt_all"], "rows") == mean(trl, "rows")}
    return out


def report_dpo(batch: int, rec: dict) -> dict:
    trl, r = rec["trl"], rec["rlpt"]
    ratio, ratio_cpu = med(trl, "total") / med(r, "total"), med(trl, "cpu") / med(r, "cpu")
    print(f"\nDPO step, {batch} pairs, reference forward every step on both sides: median ms over {len(trl)} steps")
    print("| side | ms/step | TRL/x | cpu ms | TRL/x | rows | non-pad tokens |")
    for name, x, q, qc in (("trl", trl, 1.0, 1.0), ("rlpt", r, ratio, ratio_cpu)):
        print(f"| {name:<4} | {med(x, 'total') * 1e3:>7.1f} | {q:>5.2f} | {med(x, 'cpu') * 1e3:>6.1f} | {qc:>5.2f} | "
              f"{mean(x, 'rows'):>4.0f} | {mean(x, 'tokens'):>14.0f} |")
    return {"trl_ms": round(med(trl, "total") * 1e3, 2), "rlpt_ms": round(med(r, "total") * 1e3, 2),
            "trl_cpu_ms": round(med(trl, "cpu") * 1e3, 2), "rlpt_cpu_ms": round(med(r, "cpu") * 1e3, 2),
            "trl_over_rlpt": round(ratio, 3), "trl_over_rlpt_cpu": round(ratio_cpu, 3),
            "trl_rows": mean(trl, "rows"), "rlpt_rows": mean(r, "rows"),
            "trl_tokens": round(mean(trl, "tokens"), 1), "rlpt_tokens": round(mean(r, "tokens"), 1)}


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    quiet()
    tmp = Path(tempfile.mkdtemp(prefix="vs_trl_"))
    ckpt, sft_s = sft_start(args, tmp)
    hf_dir = export_hf(ckpt, tmp / "hf")
    result = {"bench": "vs_trl", "threads": args.threads, "prompts": args.prompts, "k": args.k,
              "max_tokens": args.max_tokens,
              "mini_batches": args.mini_batches, "lr": args.lr, "warmup": args.warmup, "steps": args.steps,
              "sft_s": round(sft_s, 1), "cpu": _cpu(),
              "precision": args.precision, "rlpt_precision": args.rlpt_precision or args.precision,
              "load_avg_start": os.getloadavg(),
              "rlpt": {**_rlpt_settings(), "packing_this_run": args.packing}, "grpo": {}, "dpo": {}}
    if args.only in ("grpo", "all"):
        for beta in (float(b) for b in args.betas.split(",")):
            result["grpo"][str(beta)] = report_grpo(beta, bench_grpo(args, ckpt, hf_dir, beta, tmp))
    if args.only in ("dpo", "all") and args.precision == "bf16":
        print("DPO skipped at --precision bf16: rlpt's DPO has no bf16 setting (DPOConfig), so there is no "
              "best-vs-best pair to time")
    elif args.only in ("dpo", "all"):
        for batch in (int(b) for b in args.dpo_batches.split(",")):
            result["dpo"][str(batch)] = report_dpo(batch, bench_dpo(args, ckpt, hf_dir, batch, tmp))
    if args.curve > 0:
        curves, targets = [], [float(x) for x in args.target.split(",")]
        for seed in (int(x) for x in args.curve_seeds.split(",")):
            c = bench_curve(argparse.Namespace(**{**vars(args), "seed": seed}), ckpt, hf_dir, tmp)
            c |= {"seed": seed, "time_to_target": {k: time_to(c["points"][k], targets[0]) for k in c["points"]}}
            print(f"\nheld-out accuracy against wall-clock, seed {seed}: {json.dumps(c)}", flush=True)
            curves.append(c)
        result["curve"] = {"target": targets[0], "targets": targets, "runs": curves,
                           "time_to_target": speedups(curves, targets)}
        for key, v in result["curve"]["time_to_target"].items():
            print(f"time to {key} (target/window): TRL / rlpt per seed "
                  f"{[x['trl_over_rlpt'] for x in v['runs']]}, median {v['median']}")
        plot_curve(curves, args.plot, targets[0])
    result["load_avg_end"] = os.getloadavg()
    print(json.dumps(result))


def _rlpt_settings() -> dict:
    """rlpt's defaults that change its step's cost (packing, precision), as this checkout has them."""
    from rlpt.preference.dpo import DPOConfig
    from rlpt.train import load_train_job
    t = load_train_job("recipes/grpo_arith.yaml", []).trainer
    return {"trainer_packing": getattr(t, "packing", False), "trainer_precision": getattr(t, "precision", "fp32"),
            "dpo_packing": getattr(DPOConfig(), "packing", False)}


def _cpu() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    has = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return f"{name} ({os.cpu_count()} cpus; {' '.join(has) or 'no avx512'})"


if __name__ == "__main__":
    main()
