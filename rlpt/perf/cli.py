"""`rlpt perf memory|throughput|kv` and `rlpt diagnose RUN`: the perf formulas and the diagnosis as tables.

    rlpt perf memory --model 7b --seq 8192 --batch 4 --gpus 8        lesson 22's memory envelope and RL's copies
    rlpt perf kv --model llama-3-8b --batch 32 --seq 2048            KV bytes, capacity and decode-step time
    rlpt perf throughput --model 7b --k 16 --len 1024                 lesson 22a's per-role model per topology
    rlpt perf throughput runs/grpo                                   a run's measured split, and the allocator
    rlpt perf memory --model runs/grpo                               its model's numbers, its measured peak per role
    rlpt perf timeline runs/grpo                                     a Gantt of the last steps' roles -> timeline.png
    rlpt diagnose runs/grpo                                          findings, written into the run's report.md

--model takes a size in billions (1–700, the course's widget table), llama-3-8b / llama-3-70b / qwen2.5-7b, a
Hugging Face config.json (or its folder) or an rlpt run folder. `add_commands(sub)` registers the commands
on rlpt's parser (rlpt/cli.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rlpt.perf import configs, flops, memory, throughput
from rlpt.perf.memory import GB


def _table(rows: list[tuple[str, str]], headers=("quantity", "value")) -> str:
    from rlpt.report import table
    return table(rows, headers)


def _gb(x: float) -> str:
    return f"{x / GB:.3g} GB"


def cmd_memory(args) -> int:
    shape = configs.resolve(args.model)
    p = shape.params
    prec = memory.precision(args.precision)
    act = {m: memory.activation_bytes(shape.n_layers, args.seq, args.batch, shape.d_model, args.act_bytes, m)
           for m in ("none", "selective", "full")}
    kv_tok = memory.kv_bytes_per_token(shape, args.kv_bytes)
    rows = [("model", f"{shape.name}: {shape.n_layers} layers, d {shape.d_model}, {shape.n_heads} heads "
                      f"({shape.n_kv_heads} KV) of {shape.head_dim}"),
            ("parameters P", f"{p:.4g}"),
            (f"training bytes/param ({args.precision})",
             f"{prec.total} = {prec.weights} weights + {prec.master} master + {prec.grads} grads + {prec.optim} AdamW"),
            ("training state", _gb(memory.train_bytes(p, args.precision))),
            (f"training state / GPU ({args.gpus})", _gb(memory.train_bytes(p, args.precision) / args.gpus)),
            ("min GPUs for the state", str(memory.min_gpus(p, args.precision, args.hbm * GB))),
            (f"activations (seq {args.seq}, batch {args.batch})", _gb(act["none"])),
            ("  selective checkpointing", _gb(act["selective"])),
            ("  full checkpointing (÷8)", _gb(act["full"])),
            ("KV / token", f"{kv_tok:,} B"),
            ("inference weights", _gb(p * args.kv_bytes))]
    if shape.n_params:   # a named size: lesson 22's widget itself
        env = memory.envelope(p / 1e9, args.seq, args.batch, args.gpus, not args.no_checkpoint)
        rows += [("widget: train / GPU", _gb(env.train_per_gpu)), ("widget: inference / GPU", _gb(env.infer_per_gpu)),
                 ("widget: both fit in 80 GB", "yes" if env.fits else "no")]
    print(_table(rows))
    run = Path(args.model)
    if (run / "metrics.jsonl").is_file():
        print(_run_memory(run, shape))
    if args.rl:
        t, r, o = (int(x) for x in args.rl.split(":"))
        kv_total = memory.kv_bytes(shape, args.rollout_tokens, args.kv_bytes)
        c = memory.rl_copies(p, t, r, o, kv_total, act["full"], prec=args.precision, critic=args.critic)
        print(f"\nRL copies per device, {t} trainer : {r} reference : {o} rollout devices "
              f"({args.rollout_tokens:,} KV tokens in flight):")
        print(_table([(k, _gb(v)) for k, v in c.rows()], ("role", "per device")))
    return 0


def _run_memory(run: Path, shape) -> str:
    """A run's measured peak per role (the controller's mem/<role>_gb) beside the trainer's predicted peak for
    its largest mini-batch (prompts·K/mini_batches rows of model.max_seq_len tokens: an upper bound)."""
    from rlpt.perf.diagnose import ROLE_KEYS, read_metrics, series
    rows, cfg = read_metrics(run), configs.run_config(run)
    roll, trainer = cfg.get("rollout", {}), cfg.get("trainer", {})
    batch = roll.get("prompts_per_step", 1) * roll.get("k", 1) // max(trainer.get("mini_batches", 1), 1)
    seq = shape.max_seq_len or roll.get("max_tokens", 0)
    pred = memory.trainer_memory(shape, batch, seq, "fp32", 4, activations="llama")
    cuda = any(x for _, x in series(rows, "mem/cuda"))
    out = [(f"measured mem/{k}_gb (median)", f"{sorted(v)[len(v) // 2]:.3g} GB")
           for k in ROLE_KEYS if (v := [x for _, x in series(rows, f"mem/{k}_gb")])]
    if not out:
        return f"\n{run} logged no mem/<role>_gb (a run from before rlpt logged peak memory per role)"
    out += [("what was measured", "CUDA max_memory_allocated" if cuda else "peak resident set (VmHWM), the "
                                  "interpreter and libraries included"),
            (f"predicted trainer peak, fp32, {batch} rows × {seq} tokens",
             f"{_gb(pred.total)} = {_gb(pred.state)} state + {_gb(pred.activations)} activations + "
             f"{_gb(pred.logits)} logits")]
    return f"\n{run}: measured against predicted\n" + _table(out)


def cmd_kv(args) -> int:
    shape = configs.resolve(args.model)
    per_tok = memory.kv_bytes_per_token(shape, args.kv_bytes)
    total = memory.kv_bytes(shape, args.batch * args.seq, args.kv_bytes)
    weights = shape.params * args.kv_bytes
    d = flops.decode_step(weights, total, args.batch, shape.params, args.bandwidth * GB, args.flops * 1e12)
    rows = [("model", shape.name), ("KV / token", f"{per_tok:,} B ({per_tok / 1024:g} KiB)"),
            (f"KV of {args.batch} × {args.seq} tokens", f"{_gb(total)} ({total / memory.GiB:.3g} GiB)"),
            ("weights", _gb(weights)),
            ("decode step (weights + KV) / bandwidth", f"{d.step_s * 1e3:.3g} ms ({d.bound}-bound)"),
            ("decode tokens/s (all sequences)", f"{d.tokens_per_sec:,.0f}"),
            ("decode tokens/s per sequence", f"{d.per_seq_tokens_per_sec:,.0f}")]
    if args.k > 1:
        shared = memory.paged_blocks(args.prompt_len, args.completion_len, args.k, args.block)
        alone = memory.paged_blocks(args.prompt_len, args.completion_len, args.k, args.block, shared=False)
        rows += [(f"blocks of a group of {args.k} (prompt {args.prompt_len}, completion {args.completion_len})",
                  f"{shared} shared vs {alone} unshared ({alone / shared:.2f}×)")]
    print(_table(rows))
    return 0


def _run_throughput(run: str, args) -> int:
    from rlpt.perf.diagnose import read_metrics, role_times
    rows, cfg, shape = read_metrics(run), configs.run_config(run), configs.from_run(run)
    if not any("time/train" in r for r in rows):
        from rlpt.config import ConfigError
        raise ConfigError(f"{run} logged no time/train: per-role times come from `rlpt train` runs (the controller)")
    t = role_times(rows)
    steps = [r for r in rows if "time/train" in r][1:]
    roll, trainer = cfg.get("rollout", {}), cfg.get("trainer", {})
    samples = roll.get("prompts_per_step", 0) * roll.get("k", 0)
    mean_len = sum(r.get("response/len_mean", 0) for r in steps) / max(len(steps), 1)
    kept = sum(r.get("groups/kept", 1) for r in steps) / max(len(steps), 1)
    gen_tokens = samples * mean_len
    train_tokens = gen_tokens * kept * trainer.get("epochs", 1)
    p = shape.params
    out = [(f"time/{k}", f"{getattr(t, k):.4g} s ({v:.0%})") for k, v in t.shares().items() if k != "algo"]
    out += [("model", f"{shape.name}, P = {p:,.0f}"),
            ("sampled tokens / step", f"{gen_tokens:,.0f} ({samples} samples × {mean_len:.1f})"),
            ("rollout tokens/s", f"{gen_tokens / max(t.rollout, 1e-9):,.0f}"),
            ("trained tokens / step", f"{train_tokens:,.0f} (kept {kept:.0%}, {trainer.get('epochs', 1)} epoch(s))"),
            ("train tokens/s", f"{train_tokens / max(t.train, 1e-9):,.0f}"),
            ("train FLOP/s achieved (6P per token)",
             f"{train_tokens * flops.flops_per_token(p) / max(t.train, 1e-9):.3g}")]
    if args.flops:
        peak = args.flops * 1e12
        pred = train_tokens * flops.flops_per_token(p) / peak
        out += [(f"predicted train time at {args.flops:g} TFLOP/s", f"{pred:.4g} s (measured/predicted "
                 f"{t.train / pred:.2f}, MFU {pred / t.train:.1%})")]
    print(_table(out))
    alloc = throughput.allocate(t)
    role, share = alloc.largest()
    print(f"\nlesson 28's allocator on this split (its default optimisations): {alloc.baseline:.3g} s → "
          f"{alloc.total:.3g} s ({alloc.speedup:.2f}×), largest remaining: {role} ({share:.0%})")
    print(_table([(n, f"{s:.3g} s") for n, s in throughput.gain_of_each(t)], ("optimisation alone", "saves / step")))
    return 0


def cmd_throughput(args) -> int:
    if args.run:
        return _run_throughput(args.run, args)
    shape = configs.resolve(args.model)
    p_b = shape.params / 1e9
    rows = []
    for topo in throughput.TOPOLOGIES:
        rt = throughput.role_widget(p_b, args.k, args.len, topo, args.prompts, divide=args.divide)
        tau = rt.step(topo)
        rows.append((topo, f"{tau:.3g} s, {throughput.useful_tokens_per_sec(args.prompts, args.k, args.len, tau):,.0f}"
                           f" tok/s, rollout {(rt.rollout + rt.verify) / tau:.0%}"))
    print(f"lesson 22a's per-role model: {shape.name}, {args.prompts} prompts × K={args.k} × {args.len} tokens")
    rt = throughput.role_widget(p_b, args.k, args.len, args.topology, args.prompts, divide=args.divide)
    print(_table([(f"τ_{k}", f"{getattr(rt, k):.3g} s") for k in ("rollout", "verify", "ref", "train", "sync")]
                 + rows, ("term / topology", "seconds")))
    tf = args.flops or 800
    print(f"\ntraining throughput per device at {tf:g} TFLOP/s: "
          f"{flops.train_tokens_per_sec(shape.params, tf * 1e12):,.0f} tok/s (6P), "
          f"{flops.train_tokens_per_sec(shape.params, tf * 1e12, recompute=True):,.0f} with recompute (8P)")
    print(f"straggler tax at K={args.k}, CV {args.cv:g}: the longest of the group is "
          f"{throughput.max_of_k(1, args.cv, args.k):.2f}× the mean (lesson 22b)")
    return 0


def cmd_timeline(args) -> int:
    from rlpt.perf import timeline
    from rlpt.perf.diagnose import read_metrics
    rows = read_metrics(args.run)
    sp = timeline.spans(rows, args.steps)
    if not sp:
        from rlpt.config import ConfigError
        raise ConfigError(f"{args.run} logged no per-role times: a timeline comes from `rlpt train` runs")
    eq = timeline.equation(rows)
    path = timeline.plot(Path(args.run) / "timeline.png", sp, f"{Path(args.run).name}: last {args.steps} steps")
    out = timeline.summary(sp, eq, rows)
    print(_table(out, ("role / step", "seconds")))
    print(f"\nwritten {path}")
    return 0


def cmd_diagnose(args) -> int:
    from rlpt.perf.diagnose import diagnose, read_metrics, render, write_into_report
    rows = read_metrics(args.run)
    found = diagnose(rows, configs.run_config(args.run))
    print(render(found))
    if not args.no_report:
        print(f"\nwritten into {write_into_report(args.run, rows, found)}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `rlpt perf …` and `rlpt diagnose` on rlpt's sub-command parser."""
    perf = sub.add_parser("perf", help="memory, KV and throughput math of lessons 20–28 (named sizes, a HF "
                                       "config.json, or a run folder)")
    ps = perf.add_subparsers(dest="perf_command", metavar="WHAT", required=True)
    model = dict(default="7b", help="size in B (1–700), llama-3-8b / llama-3-70b / qwen2.5-7b, a config.json or "
                                    "a run folder (default 7b)")

    m = ps.add_parser("memory", help="bytes per parameter, activations, KV, lesson 22's envelope, RL's copies")
    m.add_argument("--model", **model)
    m.add_argument("--seq", type=int, default=8192)
    m.add_argument("--batch", type=int, default=4)
    m.add_argument("--gpus", type=int, default=8, help="FSDP degree")
    m.add_argument("--precision", default="bf16-mixed", choices=sorted(memory.PRECISIONS))
    m.add_argument("--act-bytes", type=int, default=2, help="bytes per activation element")
    m.add_argument("--kv-bytes", type=int, default=2, help="bytes per KV / inference weight element")
    m.add_argument("--hbm", type=float, default=80, help="GB per device")
    m.add_argument("--no-checkpoint", action="store_true", help="activation checkpointing off (widget rows)")
    m.add_argument("--rl", default=None, metavar="T:R:O", help="devices for trainer:reference:rollout, e.g. 4:1:3")
    m.add_argument("--rollout-tokens", type=int, default=256 * 4096, help="KV tokens the rollout holds")
    m.add_argument("--critic", action="store_true", help="PPO: a value model beside the trainer")
    m.set_defaults(fn=cmd_memory)

    k = ps.add_parser("kv", help="KV cache bytes per token and batch, a decode step against bandwidth")
    k.add_argument("--model", **model)
    k.add_argument("--batch", type=int, default=32)
    k.add_argument("--seq", type=int, default=2048)
    k.add_argument("--kv-bytes", type=int, default=2)
    k.add_argument("--bandwidth", type=float, default=3350, help="GB/s (H100: 3350)")
    k.add_argument("--flops", type=float, default=800, help="TFLOP/s sustained (H100: 800)")
    k.add_argument("--k", type=int, default=1, help="samples per prompt sharing its KV blocks")
    k.add_argument("--prompt-len", type=int, default=512)
    k.add_argument("--completion-len", type=int, default=1024)
    k.add_argument("--block", type=int, default=16)
    k.set_defaults(fn=cmd_kv)

    t = ps.add_parser("throughput", help="the per-role step equation per topology, or a run's measured split")
    t.add_argument("run", nargs="?", default=None, help="a run folder: its measured per-role times")
    t.add_argument("--model", **model)
    t.add_argument("--k", type=int, default=16)
    t.add_argument("--len", type=int, default=1024, help="mean response length")
    t.add_argument("--prompts", type=int, default=64)
    t.add_argument("--topology", default="disaggregated", choices=throughput.TOPOLOGIES)
    t.add_argument("--divide", type=float, default=4, help="the widget's second ÷4 (1: its calibration as stated)")
    t.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of response lengths")
    t.add_argument("--flops", type=float, default=None,
                   help="device TFLOP/s (default 800, an H100; with a run: the predicted train time)")
    t.set_defaults(fn=cmd_throughput)

    tl = ps.add_parser("timeline", help="a run's per-role timeline from its timestamps (a Gantt chart, "
                                        "timeline.png) beside the throughput equation's sum and max")
    tl.add_argument("run", help="an `rlpt train` run folder (in-process or Ray)")
    tl.add_argument("--steps", type=int, default=6, help="the last N training steps")
    tl.set_defaults(fn=cmd_timeline)

    d = sub.add_parser("diagnose", help="lesson 23's failure modes and lesson 28's playbook on a run folder; "
                                        "writes them into its report.md")
    d.add_argument("run", help="a run folder (metrics.jsonl, config.yaml)")
    d.add_argument("--no-report", action="store_true", help="print only; leave report.md alone")
    d.set_defaults(fn=cmd_diagnose)
