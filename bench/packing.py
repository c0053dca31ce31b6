"""Trainer tokens/s on a batch of RL rollouts: padded against packed, fp32 against bf16 autocast (issue 14).

    speed-up = tokens/s(train step, trainer.packing=true) / tokens/s(train step, padded)        goal: >= 1.4

Packing here is the trainer's: for gpt_mini the varlen layout (rlpt.framework.varlen: the tokens as one flat list,
a group's prompt once, every projection on exactly those tokens, attention causal in the row layout), otherwise
rows end to end in bins (`pack_rows(..., prefix_len=prompt_len)`); both remove the padding and the repeated
prompts. The `packed_bins_fp32` side and `fb_packed` run the bins on gpt_mini too (the control for varlen).
One batch is sampled once from the grpo_arith recipe's SFT start by rlpt's own roles (rollout, verifier,
reference, GRPO advantages, degenerate groups dropped, collate): lengths as sampled. Every side then runs the
trainer's full `train_step` on that very batch (micro-batches, forward, backward, clip, AdamW; its mini-batches)
with its own copy of the weights and optimizer; rounds alternate the order of the sides, medians are kept.
tokens = the non-pad tokens of the batch (the same for every side). The same run also measures the reference's
no-grad forward padded and packed, checks the packed gradient against the padded one (fp32, fresh weights:
max |Δ| must be ≤ 1e-6), puts packing's forward + backward next to its ceiling (the same tokens in full
rows, no padding, no mask), and reports bf16's mean and max |Δ log π| against the fp32 trainer and against the
sampler's old_logp (what the run-time check sees).

    python bench/packing.py                         # trains the recipe's SFT start first (~1 min)
    python bench/packing.py --init runs/grpo_arith/sft --rounds 7
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlpt.framework.trainer import Trainer, bf16_path
from rlpt.framework.trajectory import collate, flatten, pack_rows, per_token_logp, trained_lengths
from rlpt.framework.varlen import varlen_rows
from rlpt.optim import make_optimizer


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", default=None, help="an SFT checkpoint or run folder; default: train the recipe's now")
    p.add_argument("--recipe", default="recipes/grpo_arith.yaml")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (pinned for every side)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per step (the recipe's)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--temperature", type=float, default=None, help="default: the recipe's")
    p.add_argument("--mini-batches", type=int, default=None, help="default: the recipe's")
    p.add_argument("--micro-batch-size", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per side (alternating order)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def sft_start(args, tmp: Path) -> Path:
    if args.init:
        return Path(args.init)
    from rlpt.train import load_train_job, sft_init
    job = load_train_job(args.recipe, [f"run.out_dir={tmp}", "run.name=start", "run.progress=false",
                                       f"run.seed={args.seed}"])
    return sft_init(job, resume=False)


def rollout_batch(args, ckpt: Path):
    """The recipe's roles at the bench's shapes -> (policy, batch as the trainer gets it, loss_fn, job)."""
    from rlpt.train import build, load_train_job
    over = [f"init_from={ckpt}", f"rollout.prompts_per_step={args.prompts}", f"rollout.k={args.k}",
            "run.progress=false", f"run.seed={args.seed}", "eval.size=16"]
    over += [f"rollout.temperature={args.temperature}"] if args.temperature is not None else []
    over += [f"trainer.mini_batches={args.mini_batches}"] if args.mini_batches is not None else []
    job = load_train_job(args.recipe, [*over, f"trainer.micro_batch_size={args.micro_batch_size}"])
    ctl, _ = build(job, ckpt)
    groups = ctl.rollout.generate(ctl.env, ctl.k)
    ctl.reference.score(flatten(groups), ctl.pad_id)
    ctl.algorithm.compute_advantages(groups)
    kept = [t for t in flatten(groups) if not t.degenerate]
    return ctl.trainer.model, collate(kept, ctl.pad_id), ctl.algorithm.compute_loss, job, ctl.pad_id


def make_trainer(policy, job, packing: bool, precision: str, varlen: bool = True) -> Trainer:
    model = copy.deepcopy(policy)
    if not varlen:
        model.supports_varlen = False          # pack_batch falls back to pack_rows' bins
    t = job.trainer
    opt, sched = make_optimizer(model, t.optim, 10_000)
    return Trainer(model, opt, sched, t.optim.grad_clip, t.micro_batch_size, t.mini_batches, t.epochs,
                   temperature=job.rollout.temperature, seed=job.run.seed, packing=packing, precision=precision)


def grads(policy, job, batch, loss_fn, packing: bool) -> list[torch.Tensor]:
    tr = make_trainer(policy, job, packing, "fp32")
    tr.accumulate_grads(batch, loss_fn)
    return [p.grad for p in tr.model.parameters()]


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = sft_start(args, Path(tmp))
        policy, batch, loss_fn, job, pad_id = rollout_batch(args, ckpt)
    tokens = int((batch.input_ids != pad_id).sum())
    B, T = batch.input_ids.shape
    need = trained_lengths(batch.mask)
    packed = pack_rows(batch.input_ids, need, prefix_len=batch.prompt_len)   # the bins
    flat = varlen_rows(batch.input_ids, need, prefix_len=batch.prompt_len)     # as the trainer packs gpt_mini
    mb = max(job.trainer.mini_batches, 1)

    # correctness first: the packed gradient against the padded one, fresh weights, fp32
    g_pad, g_pack = grads(policy, job, batch, loss_fn, False), grads(policy, job, batch, loss_fn, True)
    grad_diff = max((a - b).abs().max().item() for a, b in zip(g_pad, g_pack))
    grad_scale = max(a.abs().max().item() for a in g_pad)
    with torch.no_grad():
        lp32 = make_trainer(policy, job, True, "fp32")._forward(batch)[0]
        lp16 = make_trainer(policy, job, True, "bf16")._forward(batch)[0]
    m = batch.mask > 0
    d16 = (lp16 - lp32).abs()[m]
    d16_old = (lp16 - batch.old_logp).abs()[m]
    d32_old = (lp32 - batch.old_logp).abs()[m]

    sides = {f"{'packed' if pk else 'padded'}_{pr}": make_trainer(policy, job, pk, pr)
             for pk in (False, True) for pr in ("fp32", "bf16")}
    sides["packed_bins_fp32"] = make_trainer(policy, job, True, "fp32", varlen=False)
    ref_model = copy.deepcopy(policy).eval()

    def ref_forward(packing: bool, precision: str):
        def run():
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                per_token_logp(ref_model, batch.input_ids, job.rollout.temperature,
                               packed=varlen_rows(batch.input_ids, need, prefix_len=batch.prompt_len)
                               if packing else None)          # as the reference packs gpt_mini
        return run
    # the ceiling: forward + backward of the log-probs on the padded rows, the packed rows, and the same tokens
    # in full rows with no padding and no mask at all (what removing every padding FLOP could give)
    fb_model = copy.deepcopy(policy).train()
    nonpad = batch.input_ids[batch.input_ids != pad_id]
    dense = nonpad[:nonpad.numel() // T * T].view(-1, T)

    def fwd_bwd(ids, packing=None):
        def run():
            per_token_logp(fb_model, ids, packed=packing).sum().backward()
            fb_model.zero_grad(set_to_none=True)
        return run
    runs = {k: (lambda tr=tr: tr.train_step(batch, loss_fn)) for k, tr in sides.items()}
    runs |= {"fb_padded": fwd_bwd(batch.input_ids), "fb_packed": fwd_bwd(batch.input_ids, packed),
             "fb_varlen": fwd_bwd(batch.input_ids, flat), "fb_dense_bound": fwd_bwd(dense)}
    runs |= {f"ref_{'packed' if pk else 'padded'}_{pr}": ref_forward(pk, pr)
             for pk in (False, True) for pr in ("fp32", "bf16")}
    for fn in runs.values():
        for _ in range(args.warmup):
            fn()
    # one thread: process CPU time, the work itself (a shared machine moves wall time far more); else wall time
    clock = time.process_time if args.threads == 1 else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = clock()
            runs[name]()
            times[name].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: tokens / v for k, v in med.items()}

    print(f"Trainer on one batch of RL rollouts: {B} rows x {T} columns, {tokens} non-pad tokens "
          f"({1 - tokens / (B * T):.1%} padding); packed (prompts shared within a group) into "
          f"{packed.input_ids.shape[0]} rows x {packed.input_ids.shape[1]}: {packed.tokens} tokens "
          f"({1 - packed.tokens / packed.input_ids.numel():.1%} padding); "
          f"{mb} mini-batch(es), micro-batch {args.micro_batch_size or 'whole'}; {args.threads} thread(s); "
          f"bf16 path: {bf16_path()}; median of {args.rounds} ({'CPU' if args.threads == 1 else 'wall'} time)")
    print(f"| {'side (fb_: fwd+bwd only)':<24} | {'s/step':>8} | {'tokens/s':>9} | {'x padded':>13} |")
    print(f"|{'-' * 26}|{'-' * 9}:|{'-' * 10}:|{'-' * 14}:|")
    for k in names:
        base = {"ref": "ref_padded_fp32", "fb_": "fb_padded"}.get(k[:3], "padded_fp32")
        rate = tps[k] if k != "fb_dense_bound" else dense.numel() / med[k]
        print(f"| {k:<24} | {med[k]:>8.4f} | {rate:>9.0f} | {rate / (tokens / med[base]):>13.2f} |")
    print(f"packed vs padded gradient (fp32): max |Δ| {grad_diff:.2e} (largest gradient entry {grad_scale:.2e}); "
          f"bf16 vs fp32 trainer: mean |Δlogp| {d16.mean():.2e}, max {d16.max():.2e}; against the sampler's "
          f"old_logp: bf16 mean {d16_old.mean():.2e} max {d16_old.max():.2e}, fp32 mean {d32_old.mean():.2e} "
          f"max {d32_old.max():.2e}")
    out = {"bench": "packing", "packed_speedup": round(med["padded_fp32"] / med["packed_fp32"], 3), "goal": 1.4,
           "bf16_speedup": round(med["padded_fp32"] / med["padded_bf16"], 3),
           "packed_bf16_speedup": round(med["padded_fp32"] / med["packed_bf16"], 3),
           "ref_packed_speedup": round(med["ref_padded_fp32"] / med["ref_packed_fp32"], 3),
           "fwd_bwd_packed_speedup": round(med["fb_padded"] / med["fb_packed"], 3),
           "fwd_bwd_varlen_speedup": round(med["fb_padded"] / med["fb_varlen"], 3),
           "varlen_over_bins_train_step": round(med["packed_bins_fp32"] / med["packed_fp32"], 3),
           "varlen_tokens": flat.tokens,
           "fwd_bwd_no_padding_bound": round(dense.numel() / med["fb_dense_bound"] / (tokens / med["fb_padded"]), 3),
           "tokens_per_s": {k: round(v, 1) for k, v in tps.items()}, "s_per_step": {k: round(v, 5) for k, v in
                                                                                 med.items()},
           "grad_max_abs_diff": grad_diff, "bf16_logp_mean_abs_diff": d16.mean().item(),
           "bf16_logp_max_abs_diff": d16.max().item(), "bf16_vs_old_logp_mean": d16_old.mean().item(),
           "fp32_vs_old_logp_mean": d32_old.mean().item(), "rows": B, "columns": T, "tokens": tokens,
           "pad_frac": round(1 - tokens / (B * T), 4), "packed_rows": packed.input_ids.shape[0],
           "packed_tokens": packed.tokens,
           "packed_pad_frac": round(1 - packed.tokens / packed.input_ids.numel(), 4), "bf16_path": bf16_path(),
           "threads": args.threads, "rounds": args.rounds, "mini_batches": mb,
           "micro_batch_size": args.micro_batch_size, "prompts": args.prompts, "k": args.k}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
