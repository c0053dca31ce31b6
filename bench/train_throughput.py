"""SFT training throughput: rlpt's training step against a bare PyTorch loop, same process, same batches.

    ratio = tokens/s(rlpt step) / tokens/s(bare forward + backward + AdamW)        goal: >= 0.9

The rlpt side is the step `rlpt.sft.train_sft` runs, built from the same functions:
`sft_batch` (tokenise + pad + mask, from `Problem`s) -> `sft_loss` -> backward -> `clip_grad_norm_`
-> AdamW step (`make_optimizer`) -> LR schedule step, plus the trainer's `.item()` reads every
`log_every` steps. The bare side runs the same `GPT` on the very tensors `sft_batch` built, with the
same masked-mean loss written inline and a plain `torch.optim.AdamW`: no clipping, no schedule, no
tokenising. Problems are sampled once up front (drawing them is reported separately), so both sides
see identical batches. Measurements alternate (order flipped every round) and the medians are kept,
so drift on a shared machine hits both sides alike. tokens = non-pad input tokens.

    python bench/train_throughput.py                    # default model (4 x 128), batch 64, 2 threads
    python bench/train_throughput.py --threads 1 --rounds 9 --steps 10
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F

from rlpt.config import ModelConfig, OptimConfig, SFTConfig, TaskConfig
from rlpt.gpt_mini.model import GPT, make_model
from rlpt.gpt_mini.task import make_task
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.optim import make_optimizer
from rlpt.sft import sft_batch, sft_loss


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (pinned for both sides)")
    p.add_argument("--batch-size", type=int, default=SFTConfig().batch_size)
    p.add_argument("--format", choices=["direct", "cot"], default="direct")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side before measuring")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--log-every", type=int, default=SFTConfig().log_every)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class RlptStep:
    """The trainer's step (rlpt.loop.SupervisedLoop.step over rlpt.sft's loss), on pre-sampled problems."""

    def __init__(self, model, optim: OptimConfig, total_steps: int, fmt: str, tok, log_every: int):
        self.model, self.fmt, self.tok, self.log_every, self.clip = model, fmt, tok, log_every, optim.grad_clip
        self.opt, self.sched = make_optimizer(model, optim, total_steps)
        self.n = 0

    def __call__(self, problems) -> dict:
        self.model.train()
        ids, mask = sft_batch(problems, self.fmt, self.tok)
        loss = sft_loss(self.model, ids, mask)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        self.n += 1
        if self.n % self.log_every:
            return {}
        return {"loss/sft": loss.item(), "grad/norm": gn.item(), "lr": self.sched.get_last_lr()[0],
                "tokens/step": int(mask.sum())}


class BareStep:
    """What a person would write by hand: forward, masked mean NLL, backward, AdamW."""

    def __init__(self, model, optim: OptimConfig):
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas,
                                     weight_decay=optim.weight_decay)

    def __call__(self, ids, mask) -> None:
        logits = self.model(ids)[:, :-1]                                          # (B, T-1, V)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        loss = (nll.view_as(mask) * mask).sum() / mask.sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    tok, task = CharTokenizer(), make_task(TaskConfig())
    model_cfg, optim = ModelConfig(), OptimConfig()

    n_batches = args.warmup + args.steps
    rng = random.Random(args.seed)
    t = time.perf_counter()
    problems = [[task.sample(rng, "train") for _ in range(args.batch_size)] for _ in range(n_batches)]
    sample_ms = (time.perf_counter() - t) / n_batches * 1e3
    batches = [sft_batch(ps, args.format, tok) for ps in problems]                 # the same tensors
    tokens = [int((ids != tok.pad_id).sum()) for ids, _ in batches]

    torch.manual_seed(args.seed)
    model_r = make_model(model_cfg, tok)
    model_b: GPT = make_model(model_cfg, tok)
    model_b.load_state_dict(model_r.state_dict())
    model_b.train()
    total = args.warmup + args.rounds * args.steps
    rlpt_step = RlptStep(model_r, optim, total, args.format, tok, args.log_every)
    bare_step = BareStep(model_b, optim)

    def run_rlpt(idx):
        for i in idx:
            rlpt_step(problems[i])

    def run_bare(idx):
        for i in idx:
            bare_step(*batches[i])

    warm = range(args.warmup)
    run_rlpt(warm)
    run_bare(warm)
    timed = list(range(args.warmup, n_batches))
    n_tok = sum(tokens[i] for i in timed)
    rates = {"rlpt": [], "bare": []}
    for r in range(args.rounds):
        order = [("rlpt", run_rlpt), ("bare", run_bare)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            fn(timed)
            rates[name].append(n_tok / (time.perf_counter() - t))

    rlpt_tps, bare_tps = statistics.median(rates["rlpt"]), statistics.median(rates["bare"])
    ratio = rlpt_tps / bare_tps
    n_params = model_r.num_params()
    print(f"SFT train throughput: gpt_mini {model_cfg.n_layer}x{model_cfg.d_model} ({n_params / 1e6:.2f} M params), "
          f"batch {args.batch_size} ({args.format}), {statistics.mean(tokens):.0f} tokens/step, "
          f"{args.threads} threads, {args.rounds} rounds x {args.steps} steps (median)")
    print(f"| {'loop':<36} | {'tokens/s':>10} | {'min':>10} | {'max':>10} |")
    print(f"|{'-' * 38}|{'-' * 11}:|{'-' * 11}:|{'-' * 11}:|")
    for name, label in (("rlpt", "rlpt step (batch+loss+clip+sched)"), ("bare", "bare fwd+bwd+AdamW")):
        print(f"| {label:<36} | {statistics.median(rates[name]):>10.0f} | {min(rates[name]):>10.0f} | "
              f"{max(rates[name]):>10.0f} |")
    print(f"ratio rlpt / bare = {ratio:.3f} (goal >= 0.9); drawing a batch of problems (task.sample, "
          f"not timed above) takes {sample_ms:.2f} ms")
    print(json.dumps({"bench": "train_throughput", "rlpt_tokens_per_s": round(rlpt_tps, 1),
                      "bare_tokens_per_s": round(bare_tps, 1), "ratio": round(ratio, 4), "goal": 0.9,
                      "threads": args.threads, "batch_size": args.batch_size, "format": args.format,
                      "model": model_cfg.model_dump(), "rounds": args.rounds, "steps": args.steps,
                      "sample_ms_per_batch": round(sample_ms, 3)}))


if __name__ == "__main__":
    main()
