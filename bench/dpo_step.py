"""DPO step time against the bare forward + backward on the same tokens, same process, fixed batch.

    overhead = median time(rlpt DPO step) / median time(bare fwd + bwd + AdamW on the same 2B rows)

The rlpt side is the step `rlpt.preference.dpo.run_dpo` runs: `collate_pairs` (tokenise + pad + mask)
-> `preference_loss` (one policy forward over [chosen; rejected], the reference's log-probs looked up
in the table `precompute_reference` made once, the DPO loss and its metrics) -> backward ->
`clip_grad_norm_` -> AdamW -> schedule. Two more sides show what the reference costs: DPO with a
reference forward every step (the textbook loop), and SimPO (no reference at all). The packed sides
(`dpo.packing=true`) run the same steps with [chosen; rejected] as one packed forward (rows end to end,
a block-diagonal causal mask: no FLOP on padding), for the policy and the reference alike; their sequence
log-probs are checked against the padded ones before timing. The bare side runs the same `GPT` on the very tensors
`collate_pairs` built with a masked-sum NLL written inline and a plain AdamW. Rounds alternate their
order so drift on a shared machine hits every side alike; medians are kept.

    python bench/dpo_step.py                        # gpt_mini 4 x 128, 32 pairs of CoT responses, 1 thread
    python bench/dpo_step.py --pairs 64 --threads 2 --rounds 9
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from rlpt.config import ModelConfig, TaskConfig
from rlpt.gpt_mini.model import make_model
from rlpt.gpt_mini.task import make_task
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.optim import make_optimizer
from rlpt.preference.data import PreferencePair, collate_pairs
from rlpt.preference.dpo import DPOConfig, make_reference, precompute_reference, preference_loss, sequence_logp


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (pinned for every side)")
    p.add_argument("--pairs", type=int, default=32, help="preference pairs per step (2x rows per forward)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before measuring")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def fixed_pairs(n: int, seed: int) -> list[PreferencePair]:
    """CoT chosen vs the same CoT with a wrong final sum: the shape of the pairs sample_pairs makes."""
    rng, task = random.Random(seed), make_task(TaskConfig())
    out = []
    for _ in range(n):
        p = task.sample(rng, "train")
        good = p.cot()
        bad = good[:-1].rsplit("=", 1)[0] + f"={p.gold + rng.choice([-1, 1, 10])}#"
        out.append(PreferencePair(p.prompt, good, bad))
    return out


class PrefStep:
    """run_dpo's step (SupervisedLoop.step over preference_loss); with `pairs`, its reference table
    (else a reference forward every step)."""

    def __init__(self, model, cfg: DPOConfig, tok, total: int, pairs=None):
        self.model, self.cfg, self.tok = model, cfg, tok
        self.ref = make_reference(model, cfg.method)
        self.table = precompute_reference(self.ref, pairs, tok, packing=cfg.packing) \
            if pairs is not None and self.ref is not None else None
        self.opt, self.sched = make_optimizer(model, cfg.optim, total)

    def __call__(self, pairs) -> None:
        self.model.train()
        batch = collate_pairs(pairs, self.tok)
        ref = torch.cat([self.table[:, 0], self.table[:, 1]]) if self.table is not None else None
        loss, _ = preference_loss(self.cfg, self.model, self.ref, batch, self.tok.pad_id, ref)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.sched.step()


class BareStep:
    """Forward + masked-sum NLL + backward + AdamW on the same (2B, T) tokens: no reference, no clip."""

    def __init__(self, model, lr: float):
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def __call__(self, ids, mask) -> None:
        logp, _ = sequence_logp(self.model, ids, mask)
        loss = -logp.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    tok, model_cfg = CharTokenizer(), ModelConfig()
    pairs = fixed_pairs(args.pairs, args.seed)
    batch = collate_pairs(pairs, tok)
    torch.manual_seed(args.seed)
    base = make_model(model_cfg, tok)
    names = ("dpo", "dpo_packed", "dpo_pre", "dpo_pre_packed", "simpo", "bare")
    models = {name: make_model(model_cfg, tok) for name in names}
    for m in models.values():
        m.load_state_dict(base.state_dict())
    # the packed sequence log-probs against the padded ones (what the loss is made of), before any step
    with torch.no_grad():
        seq = [sequence_logp(base, batch.ids, batch.mask, packing=pk)[0] for pk in (False, True)]   # (2B,) each
    loss_diff = (seq[0] - seq[1]).abs().max().item()
    total = args.warmup + args.rounds * args.steps
    padded = {"packing": False}
    sides = {"dpo": PrefStep(models["dpo"], DPOConfig(method="dpo", **padded), tok, total),
             "dpo_packed": PrefStep(models["dpo_packed"], DPOConfig(method="dpo", packing=True), tok, total),
             "dpo_pre": PrefStep(models["dpo_pre"], DPOConfig(method="dpo", **padded), tok, total, pairs),
             "dpo_pre_packed": PrefStep(models["dpo_pre_packed"], DPOConfig(method="dpo", packing=True), tok, total,
                                        pairs),
             "simpo": PrefStep(models["simpo"], DPOConfig(method="simpo", **padded), tok, total)}
    bare = BareStep(models["bare"], DPOConfig().optim.lr)
    run = {k: (lambda k=k: sides[k](pairs)) for k in sides} | {"bare": lambda: bare(batch.ids, batch.mask)}
    for fn in run.values():
        for _ in range(args.warmup):
            fn()
    times = {k: [] for k in run}
    names = list(run)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            for _ in range(args.steps):
                run[name]()
            times[name].append((time.perf_counter() - t) / args.steps * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = base.num_params()
    T = batch.ids.shape[1]
    tokens = int((batch.ids != tok.pad_id).sum())
    print(f"DPO step: gpt_mini {model_cfg.n_layer}x{model_cfg.d_model} ({n_params / 1e6:.2f} M params), "
          f"{args.pairs} pairs = {2 * args.pairs} rows x {T} tokens ({tokens} non-pad), {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.steps} steps (median ms/step)")
    print(f"| {'step':<50} | {'ms/step':>8} | {'min':>8} | {'max':>8} | {'x bare':>7} |")
    print(f"|{'-' * 52}|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|{'-' * 8}:|")
    labels = {"dpo": "rlpt DPO, reference forward every step",
              "dpo_packed": "  the same, packed (policy and reference)",
              "dpo_pre": "rlpt DPO, reference precomputed (run_dpo)", "dpo_pre_packed": "  the same, packed",
              "simpo": "rlpt SimPO (no reference)", "bare": "bare fwd + bwd + AdamW, same tokens"}
    for k in names:
        print(f"| {labels[k]:<50} | {med[k]:>8.1f} | {min(times[k]):>8.1f} | {max(times[k]):>8.1f} | "
              f"{med[k] / med['bare']:>7.2f} |")
    print(f"packed / padded speed-up: {med['dpo'] / med['dpo_packed']:.2f}x with a reference forward every step, "
          f"{med['dpo_pre'] / med['dpo_pre_packed']:.2f}x with the table; max |Δ log π(y)| packed - padded: "
          f"{loss_diff:.1e}")
    print(json.dumps({"bench": "dpo_step", "dpo_ms": round(med["dpo_pre"], 2),
                      "dpo_ref_per_step_ms": round(med["dpo"], 2), "simpo_ms": round(med["simpo"], 2),
                      "bare_ms": round(med["bare"], 2), "dpo_over_bare": round(med["dpo_pre"] / med["bare"], 3),
                      "dpo_ref_per_step_over_bare": round(med["dpo"] / med["bare"], 3),
                      "simpo_over_bare": round(med["simpo"] / med["bare"], 3),
                      "dpo_packed_ms": round(med["dpo_pre_packed"], 2),
                      "dpo_ref_per_step_packed_ms": round(med["dpo_packed"], 2),
                      "packed_speedup": round(med["dpo_pre"] / med["dpo_pre_packed"], 3),
                      "packed_speedup_ref_per_step": round(med["dpo"] / med["dpo_packed"], 3),
                      "packed_seq_logp_max_abs_diff": loss_diff, "pairs": args.pairs,
                      "rows": 2 * args.pairs, "seq_len": T, "tokens": tokens, "params": n_params,
                      "model": model_cfg.model_dump(), "threads": args.threads, "rounds": args.rounds,
                      "steps": args.steps}))


if __name__ == "__main__":
    main()
