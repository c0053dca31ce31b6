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

`--bf16`: the RL trainer's step (`Trainer.train_step` with GRPO's loss: per-token log-probs, backward, clip,
AdamW; packing as configured) in fp32 against `trainer.precision=bf16` (CPU autocast: bf16 matmuls, fp32
master weights, fp32 log-softmax and AdamW), same start weights, same synthetic batch (B rows of `--seq` random
tokens, the last `--response` trained with advantages ±1), alternating, CPU-time medians (a shared machine's
load hits both sides alike). Also: mean and max |log π_bf16 − log π_fp32| on the trained tokens, and the
ceiling, a bare matmul of the block's linear shapes (tokens × d_in @ d_in × d_out, forward + the two backward
products) in bf16 against fp32 with the operands already in their dtype (no casts, no other op).

    python bench/train_throughput.py --bf16 --threads 1                         # the recipe's gpt_mini 4 x 128
    python bench/train_throughput.py --bf16 --threads 1 --n-layer 8 --d-model 512 --d-ff 1408 --seq 128
"""
from __future__ import annotations

import argparse
import json
import os
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
    g = p.add_argument_group("--bf16: the RL trainer step, fp32 against bf16 autocast")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--n-layer", type=int, default=ModelConfig().n_layer)
    g.add_argument("--d-model", type=int, default=ModelConfig().d_model)
    g.add_argument("--n-head", type=int, default=ModelConfig().n_head)
    g.add_argument("--d-ff", type=int, default=ModelConfig().d_ff)
    g.add_argument("--seq", type=int, default=48, help="tokens per row (prompt + response)")
    g.add_argument("--response", type=int, default=32, help="trained tokens at the end of each row")
    g.add_argument("--rows", type=int, default=64, help="rows per train step (one mini-batch)")
    g.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--attn-bf16", action="store_true", help="the control: under bf16, run scaled_dot_product_"
                   "attention (flash) in bf16 too (gpt_mini runs rows <= 64 tokens by bf16 matmuls and the rest "
                   "by fp32 flash under autocast, rlpt.gpt_mini.attention.sdpa: this CPU's bf16 flash-attention "
                   "backward is the slow kernel at small d_model)")
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


def rl_batch(args, vocab: int, g: torch.Generator):
    """`rows` trajectories of `seq` random tokens, the last `response` sampled (mask 1), advantages ±1, collated."""
    from rlpt.framework.trajectory import Trajectory, collate
    P = args.seq - args.response
    trajs = []
    for b in range(args.rows):
        ids = torch.randint(1, vocab, (args.seq,), generator=g).tolist()
        trajs.append(Trajectory(prompt_ids=ids[:P], response_ids=ids[P:], response_mask=torch.ones(args.response),
                                old_logp=torch.zeros(args.response), reward=float(b % 2), group=b // 8))
        trajs[-1].advantage = 1.0 if b % 2 else -1.0
    return collate(trajs, pad_id=0)


def matmul_ceiling(d_in_out: list[tuple[int, int]], tokens: int, reps: int) -> dict:
    """CPU seconds of a block's linears (forward y = x W^T, backward dx = dy W, dW = dy^T x) in fp32 and in bf16
    with the operands already cast: the most bf16 can give the trainer's matmuls on this CPU."""
    def run(dtype) -> float:
        ops = [tuple(torch.randn(*shape, dtype=dtype) for shape in ((tokens, i), (o, i), (tokens, o)))
               for i, o in d_in_out]                                  # x, W, dy

        def once():
            for x, w, dy in ops:
                x @ w.T
                dy @ w
                dy.T @ x
        once()
        times = []
        for _ in range(reps):
            t = time.process_time()
            once()
            times.append(time.process_time() - t)
        return statistics.median(times)
    fp32, bf16 = run(torch.float32), run(torch.bfloat16)
    return {"fp32_s": fp32, "bf16_s": bf16, "speedup": fp32 / bf16}


def sdpa_in_bf16() -> None:
    """--attn-bf16: the control for rlpt.gpt_mini.attention.sdpa's choice under autocast: flash attention on whatever
    autocast hands it (bf16). Patches gpt_mini's `sdpa` for this process only."""
    import rlpt.gpt_mini.model as gm

    def bf16_sdpa(q, k, v, mask):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    gm.sdpa = bf16_sdpa


def main_bf16(args):
    """The RL trainer step, fp32 against bf16 autocast (module doc)."""
    if args.attn_bf16:
        sdpa_in_bf16()
    import copy

    import rlpt.algorithms  # noqa: F401 - registers grpo
    from rlpt.framework.algorithm import make_algorithm
    from rlpt.framework.trainer import Trainer, autocast, bf16_path
    from rlpt.framework.trajectory import per_token_logp
    from rlpt.gpt_mini.model import GPTConfig
    torch.set_num_threads(args.threads)
    tok = CharTokenizer()
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_head,
                    d_model=args.d_model, d_ff=args.d_ff, max_seq_len=max(64, args.seq))
    torch.manual_seed(args.seed)
    base = GPT(cfg)
    batch = rl_batch(args, tok.vocab_size, torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        batch.old_logp = per_token_logp(base, batch.input_ids) * batch.mask      # on-policy: ρ = 1 at the start
        with autocast("bf16"):
            lp_bf16 = per_token_logp(base, batch.input_ids)
        lp_fp32 = per_token_logp(base, batch.input_ids)
    gap = (lp_bf16.float() - lp_fp32).abs()[batch.mask > 0]
    algo = make_algorithm({"name": "grpo"}, 8, args.response)
    optim = OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant")
    sides = {}
    for precision in ("fp32", "bf16"):
        model = copy.deepcopy(base)
        opt, sched = make_optimizer(model, optim, 10 ** 6)
        sides[precision] = Trainer(model, opt, sched, 1.0, 0, 1, 1, packing=args.packing, precision=precision)
    for tr in sides.values():
        for _ in range(args.warmup):
            tr.train_step(batch, algo.compute_loss)
    times = {k: [] for k in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            t = time.process_time()
            for _ in range(args.steps):
                sides[name].train_step(batch, algo.compute_loss)
            times[name].append((time.process_time() - t) / args.steps)
    n_tok = int((batch.input_ids != 0).sum())
    tps = {k: n_tok / statistics.median(v) for k, v in times.items()}
    d, f = args.d_model, args.d_ff
    ceiling = matmul_ceiling([(d, d)] * 4 + [(d, f), (d, f), (f, d)], n_tok, max(3, args.rounds))
    speedup = tps["bf16"] / tps["fp32"]
    print(f"RL trainer step (GRPO loss, packing {'on' if args.packing else 'off'}"
          f"{', bf16 attention in bf16 (control)' if args.attn_bf16 else ''}), gpt_mini {args.n_layer} x "
          f"{args.d_model} (d_ff {args.d_ff}, {base.num_params() / 1e6:.2f} M params), {args.rows} rows x "
          f"{args.seq} tokens ({args.response} trained), {args.threads} thread(s), bf16 kernels: {bf16_path()}; "
          f"CPU-time medians of {args.rounds} rounds x {args.steps} steps")
    print(f"| {'precision':<9} | {'tokens/s':>9} | {'s/step':>7} |")
    print(f"|{'-' * 11}|{'-' * 10}:|{'-' * 8}:|")
    for k in sides:
        print(f"| {k:<9} | {tps[k]:>9.0f} | {statistics.median(times[k]):>7.3f} |")
    print(f"bf16 / fp32 = {speedup:.2f}x (goal >= 2); mean |dlogp| {gap.mean().item():.2e}, max {gap.max().item():.2e}"
          f" (bf16 autocast vs fp32, same weights, {gap.numel()} tokens); bare matmul ceiling at these shapes "
          f"({n_tok} tokens): {ceiling['speedup']:.2f}x; load average {os.getloadavg()[0]:.1f}")
    print(json.dumps({"bench": "train_throughput_bf16", "fp32_tokens_per_s": round(tps["fp32"], 1),
                      "bf16_tokens_per_s": round(tps["bf16"], 1), "speedup": round(speedup, 3), "goal": 2.0,
                      "mean_abs_dlogp": gap.mean().item(), "max_abs_dlogp": gap.max().item(),
                      "matmul_ceiling": {k: round(v, 4) for k, v in ceiling.items()}, "bf16_path": bf16_path(),
                      "model": {"n_layer": args.n_layer, "d_model": args.d_model, "d_ff": args.d_ff,
                                "params": base.num_params()},
                      "rows": args.rows, "seq": args.seq, "response": args.response, "packing": args.packing,
                      "attn_bf16": args.attn_bf16,
                      "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
                      "load_avg": round(os.getloadavg()[0], 2)}))


def main():
    args = parse_args()
    if args.bf16:
        return main_bf16(args)
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
