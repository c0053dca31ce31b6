"""rlpt.perf's predictions against this machine: KV bytes the engine holds, the trainer's peak memory, and a
GRPO step's per-role times, for gpt_mini (4 × 128, 0.8 M) and a 30 M Llama (10 × 512, GQA 8/4, built as a HF
LlamaForCausalLM and converted with rlpt.models.hf).

    KV pool          = num_blocks · block_size · 2 · layers · n_kv_heads · head_dim · 4 B        (lesson 20, fp32)
    KV of one group  = paged_blocks(prompt, completion, K) · block bytes                          (prefix shared)
    trainer step     = 4 B · P grads + activations + 4 logit copies   (peak rss above the rss before the step)
    trainer total    = 16 B · P (fp32 weights, grads, AdamW) + activations + logits  (peak above the bare process)
    train / ref time = 6P / 2P FLOPs per token · padded tokens / F,   F = this CPU's fp32 matmul FLOP/s
                       (+ roofline: activation bytes moved and AdamW's 28 B/param, over B_mem)
    rollout time     = max(2P · tokens / F, engine steps · 4P bytes / B_mem)                     (lesson 28)

F and B_mem are measured first (a (4096 × d) @ (d × d_ff) matmul; a 256 MB tensor sum). Each trainer-memory
measurement runs in its own process, so the peak is that step's (VmHWM reset before it). Per-role times are
medians over the timed steps of a Controller built by `rlpt.train.build`, random weights, a verifier that pays
odd lengths (every group mixed, every step trains). Prints a table, then one JSON line.

    python bench/perf_predict.py [--threads 1] [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"gpt_mini": dict(n_layer=4, n_head=4, n_kv_head=4, d_model=128, d_ff=352),
          "llama_30m": dict(n_layer=10, n_head=8, n_kv_head=4, d_model=512, d_ff=1408)}
ROLLOUT = {"gpt_mini": dict(prompts=16, k=8, max_tokens=32), "llama_30m": dict(prompts=4, k=4, max_tokens=16)}


def build_model(name: str):
    """gpt_mini as rlpt makes it; the Llama through Hugging Face and back (rlpt.models.hf)."""
    import torch

    from rlpt.config import ModelConfig
    from rlpt.gpt_mini.model import make_model
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    tok = CharTokenizer()
    torch.manual_seed(0)
    if name == "gpt_mini":
        return make_model(ModelConfig(**SHAPES[name]), tok)
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlpt.models.hf import hf_to_gpt_mini
    s = SHAPES[name]
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=s["d_model"], intermediate_size=s["d_ff"],
                                      num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                                      num_key_value_heads=s["n_kv_head"], max_position_embeddings=64,
                                      tie_word_embeddings=True, attention_dropout=0.0, rms_norm_eps=1e-5))
    return hf_to_gpt_mini(hf)


def shape_of(model):
    from rlpt.perf.configs import from_gpt_mini
    return from_gpt_mini(model.cfg.to_dict())


def matmul_rate(torch) -> float:
    """fp32 FLOP/s of a (4096 × 512) @ (512 × 1408) matmul now, best of 3."""
    a, b = torch.randn(4096, 512), torch.randn(512, 1408)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 4096 * 512 * 1408 / (time.perf_counter() - t))
    return best


def machine_rates() -> tuple[float, float]:
    """(fp32 matmul FLOP/s, memory read bytes/s) of this CPU with the current torch threads: best of 5."""
    import torch
    flops = max(matmul_rate(torch) for _ in range(2))
    big = torch.ones(64 << 20)   # 256 MB of fp32
    bw = []
    for _ in range(5):
        t = time.perf_counter()
        big.sum()
        bw.append(big.numel() * 4 / (time.perf_counter() - t))
    return flops, max(bw)


# -- 1. KV bytes -----------------------------------------------------------------------------------------
def kv_check(name: str) -> dict:
    from rlpt.engine.llm import LLM
    from rlpt.engine.sampling import SamplingParams
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    from rlpt.perf import memory
    model = build_model(name)
    shape = shape_of(model)
    llm = LLM(model, CharTokenizer(), kv_cache_bytes=32 << 20)
    llm.eos_id = None                                      # every sample runs to max_tokens
    held = sum(t.numel() * t.element_size() for t in llm.runner.kv.kv)
    block = llm.bm.block_size
    pred_pool = llm.bm.num_blocks * block * memory.kv_bytes_per_token(shape, 4)
    prompt, k, completion = list(range(3, 3 + 21)), 8, 24
    peak = [0]
    step = llm.step

    def counting_step():
        step()
        peak[0] = max(peak[0], llm.bm.num_used)
    llm.step = counting_step
    llm.generate([prompt], SamplingParams(n=k, temperature=1.0, max_tokens=completion, seed=0))
    per_block = block * memory.kv_bytes_per_token(shape, 4)
    pred_group = memory.paged_blocks(len(prompt), completion, k, block) * per_block
    return {"kv_per_token": memory.kv_bytes_per_token(shape, 4), "pool_measured": held, "pool_predicted": pred_pool,
            "group_measured": peak[0] * per_block, "group_predicted": pred_group}


# -- 2. trainer peak memory (own process) -----------------------------------------------------------------
def trim() -> None:
    """glibc keeps freed memory in its heap (rss stays up); malloc_trim(0) returns it, so rss is the live set."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def trainer_memory_child(name: str, rows: int, seq: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from rlpt.framework.trainer import Trainer
    from rlpt.framework.trajectory import Trajectory, collate
    from rlpt.perf import memory
    from rlpt.perf.probe import PeakMemory, rss_bytes
    if name != "gpt_mini":
        import transformers  # noqa: F401 - loaded before the baseline: its code is not the trainer's memory
    warm = build_model("gpt_mini")                          # load torch's kernels (a first matmul maps ~100 MB of
    warm(torch.zeros(1, 8, dtype=torch.long)).sum().backward()   # code) so the baseline has them, then free it
    del warm
    trim()
    start = rss_bytes()                                     # interpreter and libraries, before the model
    model = build_model(name)
    shape = shape_of(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    trainer = Trainer(model, opt, None, mini_batches=1)
    g = torch.Generator().manual_seed(0)
    trajs = []
    for i in range(rows):
        ids = torch.randint(3, 50, (seq,), generator=g).tolist()
        t = Trajectory(ids[:8], ids[8:], torch.ones(seq - 8), torch.full((seq - 8,), -3.0), reward=float(i % 2),
                       advantage=float(i % 2) - 0.5)
        t.ref_logp = torch.full((seq - 8,), -3.0)
        trajs.append(t)
    batch = collate(trajs, 0)

    def loss_fn(b, new_logp):
        return -(new_logp * b.advantage * b.mask).sum() / b.mask.sum(), {}
    trainer.train_step(batch, loss_fn)                      # the first step allocates AdamW's m and v
    trim()                                                  # give the freed activations back: rss = what lives
    with PeakMemory() as pm:
        trainer.train_step(batch, loss_fn)
    course, own = memory.trainer_memory(shape, rows, seq), memory.trainer_memory(shape, rows, seq, activations="llama")
    return {"source": pm.source, "params": shape.params, "measured_total": pm.peak_bytes - start,
            "measured_step": pm.peak_bytes - pm.start_bytes, "resident_between_steps": pm.start_bytes - start,
            "state": course.state, "grads": course.grads, "logits": course.logits,
            "activations_course": course.activations, "activations_llama": own.activations,
            "predicted_total_course": course.total, "predicted_step_course": course.transient,
            "predicted_total_llama": own.total, "predicted_step_llama": own.transient}


def trainer_memory(name: str, rows: int, seq: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", name, str(rows), str(seq), str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- 3. per-role step times ---------------------------------------------------------------------------------
def role_times(name: str, steps: int, flops: float, bw: float) -> dict:
    import torch

    from rlpt.checkpoint import save_checkpoint
    from rlpt.perf import memory
    from rlpt.train import build, load_train_job
    model = build_model(name)
    shape = shape_of(model)
    tmp = Path(tempfile.mkdtemp())
    save_checkpoint(tmp / "init", model, model.cfg.to_dict(), {"step": 0})
    r = ROLLOUT[name]
    job = load_train_job(None, [f"init_from={tmp / 'init'}", f"rollout.prompts_per_step={r['prompts']}",
                                f"rollout.k={r['k']}", f"rollout.max_tokens={r['max_tokens']}", "run.progress=false",
                                "trainer.mini_batches=1", *[f"model.{k}={v}" for k, v in SHAPES[name].items()]])
    ctl, _ = build(job, tmp / "init")
    ctl.env.verify = lambda prompt, response: float(len(response) % 2)
    ctl.logp_tol = None
    shapes, engine_steps = {}, [0]
    train_step, score = ctl.trainer.train_step, ctl.reference.score

    def record_train(batch, loss_fn):
        shapes["train"] = tuple(batch.input_ids.shape)
        return train_step(batch, loss_fn)

    def record_ref(trajs, pad_id):
        shapes["ref_tokens"] = sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
        shapes["ref_rows"], shapes["ref_T"] = len(trajs), max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
        shapes["gen_tokens"] = sum(len(t.response_ids) for t in trajs)
        shapes["prompt_tokens"] = sum(len(t.prompt_ids) for t in trajs)
        return score(trajs, pad_id)
    ctl.trainer.train_step, ctl.reference.score = record_train, record_ref
    times: dict[str, list[float]] = {}
    preds: dict[str, list[float]] = {}
    p = shape.params
    for i in range(3 + steps):
        engine = ctl.rollout._engine.engine(ctl.rollout.model)    # the rollout's paged engine (rlpt.engine)
        before = engine_steps[0]
        if not hasattr(engine, "_counted"):
            step = engine.step

            def counted(step=step):
                engine_steps[0] += 1
                step()
            engine.step, engine._counted = counted, True
        m = ctl.step()
        flops = matmul_rate(torch)           # this moment's rate: the machine is shared, so it moves
        if i < 3 or "time/train" not in m:
            continue
        n_steps = engine_steps[0] - before
        rows, T = shapes["train"]
        # the ref scores padded rows (rows × longest); the trainer its collated (rows, T) batch
        pred = {"train": 6 * p * rows * T / flops, "ref": 2 * p * shapes["ref_rows"] * shapes["ref_T"] / flops,
                "rollout": max(2 * p * (shapes["gen_tokens"] + shapes["prompt_tokens"] / r["k"]) / flops,
                               n_steps * 4 * p / bw)}
        # roofline, added: the memory-bound work the FLOP count leaves out, at the measured bandwidth. Train: the
        # saved activations are written (forward), read (backward) and their gradients written (3 passes), and
        # AdamW reads p, g, m, v and writes p, m, v (7 · 4 B · P). Ref: each activation written and read once.
        act_train = memory.llama_activation_bytes(shape, T, rows, 4)
        act_ref = memory.llama_activation_bytes(shape, shapes["ref_T"], shapes["ref_rows"], 4)
        roof = {"train": pred["train"] + (3 * act_train + 28 * p) / bw, "ref": pred["ref"] + 2 * act_ref / bw,
                "rollout": pred["rollout"]}
        for role in pred:
            times.setdefault(role, []).append(m[f"time/{role}"])
            preds.setdefault(role, []).append(pred[role])
            preds.setdefault(role + "_roofline", []).append(roof[role])
        times.setdefault("engine_steps", []).append(n_steps)
        times.setdefault("flops", []).append(flops)
    return {role: {"measured": statistics.median(times[role]), "predicted": statistics.median(preds[role]),
                   "roofline": statistics.median(preds[role + "_roofline"])}
            for role in ("rollout", "ref", "train")} | {"engine_steps": statistics.median(times["engine_steps"]),
                                                "matmul_flops": statistics.median(times["flops"])}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        name, rows, seq, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(trainer_memory_child(name, rows, seq, threads)))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model (after 3 warm-up steps)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from rlpt.report import machine
    flops, bw = machine_rates()
    out = {"machine": machine(), "threads": args.threads, "matmul_flops": flops, "mem_bandwidth": bw, "models": {}}
    lines = [f"Machine: {machine()}", f"fp32 matmul {flops / 1e9:.1f} GFLOP/s, memory read {bw / 1e9:.1f} GB/s",
             "", "| model | quantity | predicted | measured | measured / predicted |", "|---|---|---:|---:|---:|"]
    for name in SHAPES:
        kv = kv_check(name)
        mem = trainer_memory(name, 64, 64, args.threads)
        rt = role_times(name, args.steps, flops, bw)
        out["models"][name] = {"params": mem["params"], "kv": kv, "trainer_memory": mem, "roles": rt}
        rows = [("KV pool bytes", kv["pool_predicted"], kv["pool_measured"]),
                ("KV of a group (K 8, 21 + 24 tokens)", kv["group_predicted"], kv["group_measured"]),
                ("trainer step peak, lesson 22's activations", mem["predicted_step_course"], mem["measured_step"]),
                ("trainer step peak, rlpt's block count", mem["predicted_step_llama"], mem["measured_step"]),
                ("trainer total, rlpt's block count", mem["predicted_total_llama"], mem["measured_total"])]
        rows += [(f"time/{r} s, {r == 'rollout' and 'max(FLOPs, weight reads)' or '6P/2P FLOPs'}", rt[r]["predicted"],
                  rt[r]["measured"]) for r in ("rollout", "ref", "train")]
        rows += [(f"time/{r} s, + activation and AdamW traffic", rt[r]["roofline"], rt[r]["measured"])
                 for r in ("ref", "train")]
        # lesson 22: "good MFU in practice 50–65 %"; predicted at its midpoint, 57.5 %
        rows += [(f"time/{r} s, 6P/2P FLOPs at 57.5 % MFU", rt[r]["predicted"] / 0.575, rt[r]["measured"])
                 for r in ("ref", "train")]
        for q, pr, me in rows:
            lines.append(f"| {name} ({mem['params'] / 1e6:.2f} M) | {q} | {pr:.4g} | {me:.4g} | {me / pr:.2f} |")
        for r in ("ref", "train"):
            rt[r]["mfu"] = rt[r]["predicted"] / rt[r]["measured"]
        rt["rollout"]["ms_per_engine_step"] = 1e3 * rt["rollout"]["measured"] / rt["engine_steps"]
        lines.append(f"| {name} | achieved MFU (train, ref) against this CPU's matmul rate | | "
                     f"{rt['train']['mfu']:.0%}, {rt['ref']['mfu']:.0%} | |")
        lines.append(f"| {name} | rollout: ms per engine step ({rt['engine_steps']:.0f} steps) | | "
                     f"{rt['rollout']['ms_per_engine_step']:.1f} | |")
    print("\n".join(lines))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
