"""Inference-engine throughput: rlpt.engine vs Hugging Face generate() vs the naive loop, same weights.

    tokens/s = B · G / wall seconds of one generate() call, prefill included (median of up to --repeats
               rounds, the sides interleaved); at 1 thread also by this process's CPU time, which
               other jobs on a shared machine disturb far less

Models: gpt_mini's default shape (rlpt.config.ModelConfig, CharTokenizer vocab: 0.8 M parameters; prompt
12, G = 40) and a ~30 M-parameter Llama-style shape (8 × 512, GQA 8/4, SwiGLU 1536, vocab 8192, 29.4 M;
prompt 8, G = 24). HF runs the very same weights (rlpt.models.hf.gpt_mini_to_hf, SDPA attention,
DynamicCache). Greedy, EOS ignored, equal-length random prompts, so all three do identical work and
their tokens are compared (agreement is printed).
The naive loop (a full forward per token) is skipped where its estimated time passes --naive-budget.
Also: sampled EOS-terminated rollouts (RL's shape: lengths vary, the engine refills freed slots, HF
keeps padding finished rows), K = 16 samples per prompt with and without prompt sharing, KV memory
held vs a contiguous max-length cache, and each model's ceiling measured in this run: for gpt_mini
(fits in cache) the eager floor = GEMM time at the decode shapes + the cached K/V read once at the
copy bandwidth + other ops × the measured cost of one small op; for the 30 M model the roofline
max(bytes moved / copy bandwidth, FLOPs / GEMM rate); all by CPU time. HF's whole-generate CPU time
per step over that ceiling (prefill tokens counted at the same per-token cost) is the most any eager
engine could beat HF by on this machine (`max_speedup_vs_hf`); over the GEMM time plus one K/V read alone
(every other op free: what a perfectly fused, compiled engine would approach) it bounds any engine at
all (`max_speedup_vs_hf_zero_overhead`).
One process; torch threads pinned to each of --threads in turn. Human tables, then one JSON line.

    python bench/engine.py                                # default: 1.5-2.5 min here; ~4 min with another job running
    python bench/engine.py --quick                        # smaller: batches 1,64, fewer tokens
    python bench/engine.py --threads 1 --models gpt_mini --batches 64 --repeats 5
    python bench/engine.py --quick --threads 1 --models gpt_mini --compile   # + torch.compile (cpp_wrapper) vs eager
"""
from __future__ import annotations

import os

# Idle OpenMP workers spin by default; on a shared 2-core box a spinning worker competes with the other
# jobs for the core and 2-thread runs collapse (measured here: 181 vs 3461 tok/s, gpt_mini B=64). PASSIVE
# (before torch loads, same for every side) keeps the 2-thread numbers meaningful; export another value to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from rlpt.config import ModelConfig  # noqa: E402
from rlpt.engine import LLM, SamplingParams  # noqa: E402
from rlpt.engine.model_runner import Chunk  # noqa: E402
from rlpt.gpt_mini.model import GPT, GPTConfig  # noqa: E402
from rlpt.gpt_mini.tokenizer import CharTokenizer  # noqa: E402
from rlpt.models.hf import gpt_mini_to_hf  # noqa: E402

TOK = CharTokenizer()
MODELS = {  # name -> (config, prompt length, generated tokens)
    "gpt_mini": (GPTConfig(vocab_size=TOK.vocab_size, **ModelConfig().model_dump()), 12, 40),
    "llama30m": (GPTConfig(vocab_size=8192, n_layer=8, n_head=8, n_kv_head=4, d_model=512, d_ff=1536,
                           max_seq_len=256), 8, 24),
}


def timed(fns: dict, repeats: int, max_s: float = 6.0) -> dict:
    """Run each fn in turn, `repeats` rounds (fewer once a round passes max_s): name -> (wall median,
    cpu median, outputs of every round). Interleaving makes drift on a shared machine hit every side
    alike; CPU time (this process only) is the number to trust when other jobs compete for the cores."""
    runs = {k: ([], [], []) for k in fns}
    for _ in range(repeats):
        t_round = time.perf_counter()
        for k, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            runs[k][0].append(time.perf_counter() - w0)
            runs[k][1].append(time.process_time() - c0)
            runs[k][2].append(out)
        if time.perf_counter() - t_round > max_s:
            break
    return {k: (statistics.median(w), statistics.median(c), outs) for k, (w, c, outs) in runs.items()}


def engine_greedy(llm: LLM, ids: torch.Tensor, G: int) -> list[list[int]]:
    outs = llm.generate(ids.tolist(), SamplingParams(temperature=0, max_tokens=G, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@torch.inference_mode()
def hf_greedy(hf, ids: torch.Tensor, G: int) -> list[list[int]]:
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=G, min_new_tokens=G,
                      do_sample=False, pad_token_id=TOK.pad_id, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


@torch.inference_mode()
def naive_greedy(model, ids: torch.Tensor, G: int) -> list[list[int]]:
    for _ in range(G):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, -G:].tolist()


def naive_seconds_estimate(model, B: int, P: int, G: int, gemm_flops_s: float) -> float:
    """Σ_t 2·params·B·(P+t) FLOPs at the measured GEMM rate: the full-forward loop's O(L²) cost."""
    return 2 * model.num_params() * B * sum(P + t for t in range(G)) / gemm_flops_s


def gemm_rate(d_in: int, d_out: int, rows: int, reps: int = 20) -> float:
    x, w = torch.randn(rows, d_in), torch.randn(d_out, d_in)
    F.linear(x, w)
    t0 = time.process_time()                   # CPU time: other jobs on a shared box disturb it far less
    for _ in range(reps):
        F.linear(x, w)
    return 2 * rows * d_in * d_out * reps / (time.process_time() - t0)


def throughput(args, threads: int, results: dict, agree: dict) -> None:
    for name in args.models:
        cfg, P, G = MODELS[name]
        if args.quick:
            G = G // 2
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        hf = gpt_mini_to_hf(model)
        llm = LLM(model)
        engine_greedy(llm, torch.randint(1, cfg.vocab_size, (2, P)), 4)       # warm-up
        hf_greedy(hf, torch.randint(1, cfg.vocab_size, (2, P)), 4)
        rate = gemm_rate(cfg.d_model, cfg.d_ff, 256)
        for B in args.batches:
            ids = torch.randint(1, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(B))
            fns = {"engine": partial(engine_greedy, llm, ids, G), "hf": partial(hf_greedy, hf, ids, G)}
            res = timed(fns, args.repeats)
            if naive_seconds_estimate(model, B, P, G, rate) < args.naive_budget:   # once, apart: it is slow and
                res |= timed({"naive": partial(naive_greedy, model, ids, G)}, 1)     # would end the rounds early
            row = {k: B * G / res[k][0] if k in res else None for k in ("engine", "hf", "naive")}
            row.update({f"{k}_cpu": B * G / res[k][1] for k in res if threads == 1})
            out_e = res["engine"][2][-1]
            for k in ("hf", "naive"):
                if k in res:
                    agree[f"{name}/B{B}/{k}"] = sum(a == b for a, b in zip(out_e, res[k][2][-1])) / B
            results.setdefault(str(threads), {}).setdefault(name, {})[str(B)] = row
            cpu = f"   by CPU time {row['engine_cpu'] / row['hf_cpu']:5.2f}x" if threads == 1 else ""
            print(f"  {threads}t {name:9s} B={B:<4d} engine {row['engine']:8.0f}  hf {row['hf']:8.0f}  naive "
                  f"{row['naive'] or float('nan'):8.0f} tok/s   engine/hf {row['engine'] / row['hf']:5.2f}x{cpu}",
                  flush=True)


def sampled_rollouts(args, B: int, G: int = 48) -> dict:
    """RL's shape: T = 1 sampling until EOS. Useful tokens (up to EOS) per second."""
    cfg, P, _ = MODELS["gpt_mini"]
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    hf = gpt_mini_to_hf(model)
    llm = LLM(model, TOK)
    ids = torch.randint(1, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(7))
    # no seed: each request draws its own (a shared seed = a shared stream)
    sp = SamplingParams(temperature=1.0, max_tokens=G)

    def eng():
        t0, c0 = time.perf_counter(), time.process_time()
        n = sum(len(c.token_ids) for o in llm.generate(ids.tolist(), sp) for c in o.outputs)
        return n / (time.perf_counter() - t0), n / (time.process_time() - c0), n

    @torch.inference_mode()
    def hfs():        # HF draws from torch's global RNG: each round samples anew, so rates are per round
        t0, c0 = time.perf_counter(), time.process_time()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=G, do_sample=True,
                          temperature=1.0, top_k=0, top_p=1.0, pad_token_id=TOK.pad_id, eos_token_id=TOK.eos_id)
        n = sum(r.index(TOK.eos_id) + 1 if TOK.eos_id in r else len(r) for r in out[:, P:].tolist())
        return n / (time.perf_counter() - t0), n / (time.process_time() - c0), n
    eng(), hfs()
    res = timed({"engine": eng, "hf": hfs}, max(3, args.repeats), max_s=10.0)
    med = {k: [statistics.median(r[i] for r in res[k][2]) for i in range(3)] for k in res}
    return {"B": B, "engine": med["engine"][0], "hf": med["hf"][0], "engine_cpu": med["engine"][1],
            "hf_cpu": med["hf"][1], "engine_mean_len": med["engine"][2] / B, "hf_mean_len": med["hf"][2] / B}


def prefix_sharing(K: int = 16, prompts: int = 16, P: int = 40, G: int = 16) -> dict:
    cfg = MODELS["gpt_mini"][0]
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    ids = torch.randint(1, cfg.vocab_size, (prompts, P), generator=torch.Generator().manual_seed(3)).tolist()
    out = {}
    for mode in ("shared", "unshared"):
        llm = LLM(model, enable_prefix_caching=False, num_blocks=K * prompts * 4 + 1)    # no preemption either way
        llm.generate(ids[:1], SamplingParams(max_tokens=2))
        base = dict(llm.metrics())
        t0 = time.perf_counter()
        if mode == "shared":        # one request per prompt with n = K: one prefill, forked blocks
            llm.generate(ids, SamplingParams(n=K, temperature=1.0, max_tokens=G, ignore_eos=True))
        else:                       # K independent requests per prompt
            llm.generate([p for p in ids for _ in range(K)],
                         SamplingParams(temperature=1.0, max_tokens=G, ignore_eos=True))
        dt = time.perf_counter() - t0
        m = llm.metrics()
        assert m["engine/preemptions"] == 0
        out[mode] = {"seconds": dt, "prefill_tokens": m["tokens/prefill"] - base["tokens/prefill"],
                     "kv_blocks_peak": m["kv/blocks_peak"],
                     "kv_bytes_peak": m["kv/blocks_peak"] * m["kv/bytes_per_block"]}
    out["prefill_cut"] = out["unshared"]["prefill_tokens"] / out["shared"]["prefill_tokens"]
    return out


def kv_memory(B: int = 64, max_seq_len: int | None = None) -> dict:
    """KV held at peak by B sampled sequences (EOS-terminated, ragged prompts of 4..23 tokens) vs a
    contiguous cache reserving max_seq_len per sequence. Block counts do not depend on the width, so the
    256-token variant keeps gpt_mini's width and only lengthens the context (and max_tokens)."""
    cfg = MODELS["gpt_mini"][0]
    if max_seq_len:
        cfg = GPTConfig(**{**cfg.to_dict(), "max_seq_len": max_seq_len})
    torch.manual_seed(0)
    llm = LLM(GPT(cfg).eval(), TOK, enable_prefix_caching=False)
    lens = torch.randint(4, 24, (B,), generator=torch.Generator().manual_seed(5)).tolist()
    llm.generate([[1] * L for L in lens], SamplingParams(temperature=1.0, max_tokens=cfg.max_seq_len))
    m = llm.metrics()
    held = m["kv/blocks_peak"] * m["kv/bytes_per_block"]
    contiguous = B * cfg.max_seq_len * llm.runner.kv.bytes_per_token
    return {"B": B, "max_seq_len": cfg.max_seq_len, "paged_bytes_peak": held, "contiguous_bytes": contiguous,
            "ratio": contiguous / held}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.gemms = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (torch.Tag.core not in func.tags and name in ("view", "_unsafe_view", "as_strided", "detach")):
            self.ops += 1
            self.gemms += name in ("linear", "mm", "addmm", "bmm", "baddbmm")
        return func(*args, **(kwargs or {}))


def ceiling(name: str, B: int) -> dict:
    """The best this model could do per decode step on this machine, measured now."""
    cfg, P, G = MODELS[name]
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    llm = LLM(model, enable_prefix_caching=False)
    ctx = P + G // 2                                                # mean context over a run
    shapes = [(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim), (cfg.n_head * cfg.head_dim, cfg.d_model),
              (cfg.d_model, 2 * cfg.d_ff), (cfg.d_ff, cfg.d_model)]
    t_gemm = 0.0
    for d_in, d_out in shapes:
        t_gemm += cfg.n_layer * 2 * B * d_in * d_out / gemm_rate(d_in, d_out, B)
    t_gemm += 2 * B * cfg.d_model * cfg.vocab_size / gemm_rate(cfg.d_model, cfg.vocab_size, B)
    flops = 2 * B * (model.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model))
    x = torch.randn(B, cfg.d_model)
    for _ in range(100):
        x + x
    t0 = time.process_time()
    for _ in range(2000):
        x + x
    t_op = (time.process_time() - t0) / 2000
    big, dst = torch.ones(64 << 20, dtype=torch.uint8), torch.zeros(64 << 20, dtype=torch.uint8)
    dst.copy_(big)
    t0 = time.process_time()
    for _ in range(5):
        dst.copy_(big)
    bw = 2 * big.numel() * 5 / (time.process_time() - t0)           # read + write bytes per second
    # one decode step, counted: schedule a batch of B sequences at context ctx and run the forward
    seqs = [[1] * ctx for _ in range(B)]
    llm.generate(seqs[:1], SamplingParams(max_tokens=1))
    tables = [list(range(i * 16, i * 16 + -(-(ctx + 1) // 16))) for i in range(B)]
    chunks = [Chunk([1], ctx, t, 1) for t in tables]
    with OpCounter() as oc:
        llm.runner.run(chunks).argmax(-1).tolist()
    c0 = time.process_time()
    for _ in range(5):
        llm.runner.run(chunks).argmax(-1).tolist()
    t_step = (time.process_time() - c0) / 5                         # the engine's decode step, CPU time
    weight_bytes = model.num_params() * 4
    kv_bytes = B * ctx * llm.runner.kv.bytes_per_token
    # GEMMs at their measured rate + reading every cached K/V once (attention's unavoidable traffic)
    # + every other op at the cost of one small op
    eager_floor = t_gemm + kv_bytes / bw + (oc.ops - oc.gemms) * t_op
    roofline = max((weight_bytes + kv_bytes) / bw, flops / (flops / t_gemm))
    # no engine of any kind (compiled, fused, zero scheduling cost) can beat: the GEMMs at MKL's rate plus one
    # read of the cached K/V, with norms, attention arithmetic, sampling and Python all free
    zero_overhead = max(t_gemm + kv_bytes / bw, (weight_bytes + kv_bytes) / bw)
    best = B / (eager_floor if name == "gpt_mini" else roofline)
    return {"model": name, "B": B, "ops_per_step": oc.ops, "gemms_per_step": oc.gemms, "op_us": t_op * 1e6,
            "gemm_ms_per_step": t_gemm * 1e3, "kv_read_ms_per_step": kv_bytes / bw * 1e3,
            "gemm_gflops": flops / t_gemm / 1e9, "copy_gb_s": bw / 1e9,
            "bytes_per_step": weight_bytes + kv_bytes, "eager_floor_tok_s": B / eager_floor,
            "roofline_tok_s": B / roofline, "zero_overhead_tok_s": B / zero_overhead, "ceiling_tok_s": best,
            "engine_step_tok_s": B / t_step, "engine_step_ms": t_step * 1e3,
            "engine_frac_of_ceiling": B / t_step / best}


def compiled_decode(B: int = 64, repeats: int = 7) -> dict:
    """torch.compile of the whole decode forward against the eager runner (gpt_mini, greedy, B sequences).

    What is compiled: embed -> per layer (RMSNorm, q|k|v GEMM, RoPE in real arithmetic (inductor generates no
    complex code), K/V write, paged decode attention, o GEMM + residual, RMSNorm, gate|up GEMM, SiLU·up, down
    GEMM + residual) -> norm -> head, as ONE graph (fullgraph, dynamic shapes: B and the context change every
    step), with inductor's C++ wrapper (`cpp_wrapper=True`: the graph's launcher is C++, not Python, cutting
    the per-kernel Python dispatch this bench's ceiling prices). The K/V write and the sparse in-place decode
    attention are custom ops (inductor cannot trace sparse kernels); prefill steps stay eager. Tokens must
    equal the eager engine's. -> compile seconds, CPU ms per generate for both, and their ratio."""
    import torch._inductor.config as inductor_config

    from rlpt.engine.paged_attention import paged_decode_attention
    inductor_config.cpp_wrapper = True

    @torch.library.custom_op("rlpt_bench::kv_write", mutates_args=("pool",))
    def kv_write(pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        k_rows, v_rows = pool.view(2, -1, pool.shape[-1]).unbind(0)
        k_rows.index_copy_(0, slots, k)
        v_rows.index_copy_(0, slots, v)

    @torch.library.custom_op("rlpt_bench::decode_attention", mutates_args=())
    def decode_attention(q: torch.Tensor, pool: torch.Tensor, crow: torch.Tensor, index: torch.Tensor,
                         bias: torch.Tensor, offsets: torch.Tensor, S: int) -> torch.Tensor:
        k_rows, v_rows = pool.view(2, -1, pool.shape[-1]).unbind(0)
        pattern = torch.sparse_csr_tensor(crow, index, bias, size=(q.shape[0], k_rows.shape[0]),
                                          check_invariants=False)
        return paged_decode_attention(q, k_rows, v_rows, pattern, index, S, offsets)
    decode_attention.register_fake(lambda q, *a: torch.empty_like(q))

    cfg, P, G = MODELS["gpt_mini"]
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    ids = torch.randint(1, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(1)).tolist()
    sp = SamplingParams(temperature=0, max_tokens=G, ignore_eos=True)
    llms = {"eager": LLM(model), "compiled": LLM(model)}
    r = llms["compiled"].runner
    H, Hkv, hd, eps, d, L = r.H, r.Hkv, r.hd, r.eps, cfg.d_model, cfg.n_layer

    def step(ids, positions, slots, crow, index, bias, offsets, S: int, cos_all, sin_all, embed, norms, w_qkv,
             wt_o, w_gate_up, wt_down, final_norm, w_head, pools):
        N = ids.shape[0]
        cos, sin = cos_all[positions], sin_all[positions]                      # (N, 1, hd/2)
        x = F.embedding(ids, embed)
        for i in range(L):
            qkv = F.linear(F.rms_norm(x, (d,), norms[2 * i], eps), w_qkv[i])
            pairs = qkv[:, :(H + Hkv) * hd].reshape(N, H + Hkv, hd // 2, 2)     # pair-interleaved q, k
            xe, xo = pairs[..., 0], pairs[..., 1]
            qk = torch.stack([xe * cos - xo * sin, xe * sin + xo * cos], -1)
            kv_write(pools[i], qk[:, H:].reshape(N * Hkv, hd), qkv[:, (H + Hkv) * hd:].reshape(N * Hkv, hd), slots)
            o = decode_attention(qk[:, :H].reshape(N * H, hd), pools[i], crow, index, bias, offsets, S)
            x = torch.addmm(x, o.view(N, H * hd), wt_o[i])
            gate, up = F.linear(F.rms_norm(x, (d,), norms[2 * i + 1], eps), w_gate_up[i]).chunk(2, -1)
            x = torch.addmm(x, F.silu(gate) * up, wt_down[i])
        return F.linear(F.rms_norm(x, (d,), final_norm, eps), w_head)

    fn = torch.compile(step, dynamic=True, fullgraph=True)
    eager_forward, cos_all, sin_all = r.forward, r.cis.real.contiguous(), r.cis.imag.contiguous()

    @torch.inference_mode()
    def forward(fb):
        if fb.pattern is None or fb.logits_index is not None:                  # prefill: eager
            return eager_forward(fb)
        m, R = r.served, fb.offsets.shape[0]
        norms = [t for layer in m.layers for t in (layer.input_norm, layer.post_attn_norm)]
        return fn(fb.input_ids, fb.positions, fb.slots, torch.arange(0, R * fb.S + 1, fb.S), fb.index,
                  fb.pattern.values().clone(), fb.offsets, fb.S, cos_all, sin_all, m.embed, norms, r.w_qkv, r.wt_o,
                  r.w_gate_up, r.wt_down, m.norm, r.w_head, r.kv.kv).float()
    r.forward = forward
    t0 = time.perf_counter()
    tokens = {k: [o.outputs[0].token_ids for o in llm.generate(ids, sp)] for k, llm in llms.items()}
    compile_s = time.perf_counter() - t0
    for llm in llms.values():                                                   # other shapes: no recompile after
        llm.generate(ids[:B // 2], sp)
    res = timed({k: partial(llm.generate, ids, sp) for k, llm in llms.items()}, repeats, max_s=60.0)
    eager_ms, compiled_ms = res["eager"][1] * 1e3, res["compiled"][1] * 1e3
    return {"B": B, "compile_s": compile_s, "tokens_equal": tokens["eager"] == tokens["compiled"],
            "eager_ms_cpu": eager_ms, "compiled_ms_cpu": compiled_ms, "compiled_over_eager": compiled_ms / eager_ms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--models", default="gpt_mini,llama30m")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive-budget", type=float, default=6.0, help="skip the naive loop above this estimate (s)")
    p.add_argument("--quick", action="store_true", help="batches 1,64, half the tokens, 1 repeat")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (inductor, cpp_wrapper) of the "
                                                          "whole decode step against eager (1-3 min to compile here)")
    args = p.parse_args()
    if args.quick:
        args.batches, args.repeats = "1,64", 1
    args.threads = [int(t) for t in args.threads.split(",")]
    args.models = args.models.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    load0, t_start = os.getloadavg()[0], time.perf_counter()
    results, agree, extra = {}, {}, {}
    print(f"engine throughput, wall-clock tok/s (greedy, EOS ignored; median of up to {args.repeats} interleaved "
          f"runs); 1-min load avg {load0:.2f} on {os.cpu_count()} cores")
    for th in args.threads:
        torch.set_num_threads(th)
        throughput(args, th, results, agree)
    torch.set_num_threads(args.threads[0])
    if "gpt_mini" in args.models:
        extra["sampled"] = [sampled_rollouts(args, B) for B in (64, 256) if B in args.batches or args.quick]
        print("sampled EOS-terminated rollouts (gpt_mini, T=1, max 48 tokens): useful tokens/s")
        for r in extra["sampled"]:
            print(f"  B={r['B']:<4d} engine {r['engine']:9.0f}  hf {r['hf']:9.0f}   "
                  f"engine/hf {r['engine'] / r['hf']:5.2f}x"
                  f" (CPU time {r['engine_cpu'] / r['hf_cpu']:.2f}x)"
                  f"   mean length engine {r['engine_mean_len']:.1f} hf {r['hf_mean_len']:.1f}")
        extra["prefix_sharing"] = ps = prefix_sharing()
        print("K=16 samples x 16 prompts of 40 tokens, 16 generated (gpt_mini)")
        for mode in ("shared", "unshared"):
            r = ps[mode]
            print(f"  {mode:9s} prefill tokens {r['prefill_tokens']:6d}  time {r['seconds']:6.2f} s  "
                  f"KV peak {r['kv_bytes_peak'] / 2**20:6.2f} MiB")
        print(f"  prefill work cut {ps['prefill_cut']:.1f}x by sharing")
        extra["kv_memory"] = [kv_memory(), kv_memory(max_seq_len=256)]
        for kv in extra["kv_memory"]:
            print(f"KV held, B={kv['B']} sampled to EOS, context {kv['max_seq_len']}: paged peak "
                  f"{kv['paged_bytes_peak'] / 2**20:.2f} MiB vs contiguous max-length "
                  f"{kv['contiguous_bytes'] / 2**20:.2f} MiB "
                  f"({kv['ratio']:.1f}x less)")
    extra["ceiling"] = []
    th = str(args.threads[0])
    for name in args.models:
        Bc = 64 if 64 in args.batches else args.batches[-1]
        c = ceiling(name, Bc)
        extra["ceiling"].append(c)
        print(f"ceiling {name} B={Bc} ({th} thread): {c['ops_per_step']} ops/step ({c['gemms_per_step']} GEMMs, "
              f"{c['gemm_ms_per_step']:.2f} ms at {c['gemm_gflops']:.0f} GFLOP/s), small op {c['op_us']:.1f} us, "
              f"copy {c['copy_gb_s']:.1f} GB/s, {c['bytes_per_step'] / 2**20:.1f} MiB/step -> eager floor "
              f"{c['eager_floor_tok_s']:.0f}, roofline {c['roofline_tok_s']:.0f} tok/s; engine decode step "
              f"{c['engine_step_tok_s']:.0f} tok/s (CPU time) = {c['engine_frac_of_ceiling']:.0%} of "
              f"{'eager floor' if name == 'gpt_mini' else 'roofline'}")
    for c in extra["ceiling"]:                  # how far any engine could beat HF on this machine
        r = results.get(th, {}).get(c["model"], {}).get(str(c["B"]), {})
        if "hf_cpu" in r:
            # a whole generate also prefills P tokens per sequence: counted at the decode step's cost per token
            _, P, G = MODELS[c["model"]]
            G = G // 2 if args.quick else G
            c["hf_ms_per_generated_token_step"] = c["B"] / r["hf_cpu"] * 1e3
            c["floor_ms_per_generated_token_step"] = c["B"] / c["ceiling_tok_s"] * (G + P) / G * 1e3
            c["max_speedup_vs_hf"] = c["hf_ms_per_generated_token_step"] / c["floor_ms_per_generated_token_step"]
            zero_ms = c["B"] / c["zero_overhead_tok_s"] * (G + P) / G * 1e3
            c["max_speedup_vs_hf_zero_overhead"] = c["hf_ms_per_generated_token_step"] / zero_ms
            print(f"  {c['model']}: HF {c['hf_ms_per_generated_token_step']:.2f} ms per generated-token step (CPU "
                  f"time, whole generate) vs ceiling {c['floor_ms_per_generated_token_step']:.2f} (decode floor, "
                  f"prefill included) -> at most {c['max_speedup_vs_hf']:.2f}x HF; a zero-overhead engine (GEMMs + "
                  f"one K/V read, nothing else) {zero_ms:.2f} ms -> {c['max_speedup_vs_hf_zero_overhead']:.2f}x")
    if args.compile:
        extra["compiled_decode"] = c = compiled_decode()
        print(f"torch.compile of the whole decode step (inductor, cpp_wrapper, dynamic, fullgraph), gpt_mini "
              f"B={c['B']}: compile {c['compile_s']:.0f} s; per generate {c['compiled_ms_cpu']:.1f} ms vs eager "
              f"{c['eager_ms_cpu']:.1f} ms CPU time ({c['compiled_over_eager']:.2f}x); tokens equal: "
              f"{c['tokens_equal']}")
    goals = {}
    for th_s, per in results.items():
        for name in ("gpt_mini", "llama30m"):
            r = per.get(name, {}).get("64")
            if r:
                goals[f"{name}_B64_{th_s}t_vs_hf"] = r["engine"] / r["hf"]
                if "engine_cpu" in r:
                    goals[f"{name}_B64_{th_s}t_vs_hf_cpu_time"] = r["engine_cpu"] / r["hf_cpu"]
    print("goals: " + ", ".join(f"{k} {v:.2f}x" for k, v in goals.items())
          + (f", prefill cut {extra['prefix_sharing']['prefill_cut']:.1f}x" if "prefix_sharing" in extra else ""))
    print(f"token agreement engine vs hf / naive (fraction of sequences equal): "
          f"{min(v for k, v in agree.items() if k.endswith('hf')):.2f} / "
          f"{min([v for k, v in agree.items() if k.endswith('naive')] or [float('nan')]):.2f} (min over cells)")
    print(f"wall {time.perf_counter() - t_start:.0f} s; 1-min load avg {load0:.2f} -> {os.getloadavg()[0]:.2f}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    rnd = lambda o: {k: rnd(v) for k, v in o.items()} if isinstance(o, dict) else \
        [rnd(v) for v in o] if isinstance(o, list) else round(o, 3) if isinstance(o, float) else o
    print(json.dumps(rnd({"bench": "engine", "threads": args.threads, "repeats": args.repeats,
                          "workload": {n: {"prompt": MODELS[n][1],
                                           "generated": MODELS[n][2] // (2 if args.quick else 1)}
                                       for n in args.models},
                          "tok_s": results, "speedup_vs_hf": goals, "agreement": agree, **extra,
                          "load_avg": [load0, os.getloadavg()[0]], "wall_s": time.perf_counter() - t_start})))


if __name__ == "__main__":
    main()
