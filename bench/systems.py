"""Ray topologies on this machine: weight-sync time per transport, and step time colocated vs one-step-off vs async,
compute-bound and with a latency-bound verifier, beside the throughput equation's prediction.

    sync:   trainer actor -> 2 rollout actors, gpt_mini (0.81 M params, 3.2 MB) and a 100 MB payload (64 tensors),
            over the Ray object store and a ray.util.collective gloo broadcast; median of --sync-reps, with and
            without the digest check (sha256 of the weights on both sides)
    step:   GRPO on gpt_mini default (random init, reward = parity of the response length so every group is mixed
            and every step trains), B prompts x K samples x max_tokens, 1 rollout worker
            colocated        the in-process Controller, --threads torch threads (1: one core)
            one_step_off     rollout actor + trainer actor, 1 thread each (two cores)
            async            η = --eta
            latency-bound:   the verifier sleeps --verify-s per batch (a judge or sandbox stand-in)
    prediction (lesson 19's throughput equation), from each run's own role medians and from the colocated run's:
            colocated  R + V + ref + train + sync        (a sum: one role at a time)
            overlapped max(R + V, ref + train)           (one_step_off / async: the slower side sets the pace)
    The runs train apart (staleness changes the updates, so the response lengths drift): compare their `len`.

    python bench/systems.py [--threads 1] [--steps 8] [--prompts 16] [--k 8] [--max-tokens 32] [--verify-s 1.5]

Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlpt.checkpoint import save_checkpoint
from rlpt.config import ModelConfig
from rlpt.gpt_mini.model import make_model
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.systems.transport import make_transport
from rlpt.train import build, load_train_job

ROLES = ("time/rollout", "time/verify", "time/ref", "time/train", "time/sync")


def parity_build(job, init):
    """rlpt.train.build, then reward = parity of the response length: every group mixed, every step trains.
    Defined in __main__, so Ray ships it to the actors by value (the `build` seam of rlpt.systems)."""
    ctl, heldout = build(job, init)
    ctl.env.verify = lambda prompt, response: float(len(response) % 2)
    ctl.logp_tol = None
    return ctl, heldout


class Peer:
    """A sync endpoint: a module of named tensors and a transport (rank 0 sends, the others receive)."""

    def __init__(self, shapes: dict, transport: str, verify: bool, group: str, seed: int):
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(seed)
        self.model = torch.nn.Module()
        for name, shape in shapes.items():
            self.model.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=g)))
        self.t = make_transport(transport, verify, group)

    def join(self, world: int, rank: int) -> None:
        self.t.join(world, rank)

    def publish(self, version: int):
        return self.t.publish(self.model, version)

    def send(self) -> None:
        self.t.send(self.model)

    def apply(self, payload) -> int:
        return self.t.apply(payload, self.model)


def bench_sync(ray, shapes: dict, transport: str, verify: bool, reps: int) -> float:
    """Median seconds of one sync, publish to the last receiver's check, 1 sender -> 2 receivers."""
    P = ray.remote(num_cpus=1)(Peer)
    group = f"bench_{transport}_{len(shapes)}_{verify}_{time.time_ns()}"
    peers = [P.remote(shapes, transport, verify, group, seed=r) for r in range(3)]
    if transport == "gloo":
        ray.get([p.join.remote(3, r) for r, p in enumerate(peers)])
    times = []
    for v in range(reps + 1):
        t0 = time.perf_counter()
        payload = ray.get(peers[0].publish.remote(v))
        sends = [peers[0].send.remote()] if transport == "gloo" else []
        ray.get([p.apply.remote(payload) for p in peers[1:]] + sends)
        if v:   # the first is a warm-up
            times.append(time.perf_counter() - t0)
    for p in peers:
        ray.kill(p)
    return statistics.median(times)


def slow(ctl, seconds: float) -> None:
    """Colocated: the rollout's verify takes `seconds` more per batch (counted in time/verify)."""
    generate = ctl.rollout.generate

    def slowed(env, K):
        groups = generate(env, K)
        time.sleep(seconds)
        ctl.rollout.stats["time/verify"] = ctl.rollout.stats.get("time/verify", 0.0) + seconds
        return groups
    ctl.rollout.generate = slowed


def timed_steps(step, n: int, warmup: int = 2) -> tuple[float, list[dict]]:
    rows, walls = [], []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        m = step()
        if i >= warmup:
            walls.append(time.perf_counter() - t0)
            rows.append(m)
    return statistics.median(walls), rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1,
                   help="colocated torch threads (the actors get 1 each); 1 by default: on a 2-core machine shared "
                        "with other processes two OpenMP threads make each step ~10x slower (measured: 14 s vs 1.5 s)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per setting (after 2 warm-up steps)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--verify-s", type=float, default=1.5, help="latency-bound verifier: seconds per batch")
    p.add_argument("--eta", type=int, default=1, help="async max_staleness")
    p.add_argument("--sync-reps", type=int, default=5)
    args = p.parse_args()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t0

    # -- sync -------------------------------------------------------------------------------------------------
    mini = make_model(ModelConfig(), CharTokenizer())
    shapes = {"mini": {n.replace(".", "_"): tuple(q.shape) for n, q in mini.named_parameters()},
              "100MB": {f"w{i:02d}": (400, 1024) for i in range(64)}}   # 64 x 400 x 1024 fp32 = 104.9 MB
    sync = {}
    for name, sh in shapes.items():
        for transport in ("object_store", "gloo"):
            for verify in (False, True):
                sync[(name, transport, verify)] = bench_sync(ray, sh, transport, verify, args.sync_reps)
    mb = {name: sum(torch.Size(s).numel() for s in sh.values()) * 4 / 1e6 for name, sh in shapes.items()}

    # -- steps ------------------------------------------------------------------------------------------------
    from rlpt.systems.runner import RaySystem
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    save_checkpoint(tmp / "init", mini, mini.cfg.to_dict(), {"step": 0})
    common = [f"init_from={tmp / 'init'}", f"rollout.prompts_per_step={args.prompts}", f"rollout.k={args.k}",
              f"rollout.max_tokens={args.max_tokens}", "run.progress=false", "trainer.mini_batches=1",
              f"run.out_dir={tmp}"]
    steps: dict = {}
    job = load_train_job(None, common)
    ctl, _ = parity_build(job, tmp / "init")
    steps[("colocated", "compute")] = timed_steps(ctl.step, args.steps)
    slow(ctl, args.verify_s)
    steps[("colocated", "latency")] = timed_steps(ctl.step, args.steps)
    torch.set_num_threads(1)
    for top in ("one_step_off", "async"):
        job = load_train_job(None, [*common, f"system.topology={top}", f"system.max_staleness={args.eta}"])
        s = RaySystem(job, parity_build, tmp / "init", threads=1)
        steps[(top, "compute")] = timed_steps(s.step, args.steps)
        ray.get([w.slow_verify.remote(args.verify_s) for w in s.workers])
        steps[(top, "latency")] = timed_steps(s.step, args.steps, warmup=3)
        s.close()

    # -- the throughput equation: from the colocated run's role medians, and from each run's own ------------------
    def terms(rows: list[dict]) -> dict:
        med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in (*ROLES, "response/len_mean")}
        return {"gen": med["time/rollout"] + med["time/verify"], "train": med["time/ref"] + med["time/train"],
                "sync": med["time/sync"], "len": med["response/len_mean"], **med}

    own, pred, pred_own = {}, {}, {}
    for key, (_, rows) in steps.items():
        own[key] = t = terms(rows)
        # colocated: one role at a time, a sum; overlapped: the slower side sets the pace (the sync the overlapped
        # runs report waits for the generation in flight, so their own prediction leaves it out: ~0.02 s here)
        pred_own[key] = t["gen"] + t["train"] + t["sync"] if key[0] == "colocated" else max(t["gen"], t["train"])
    for load in ("compute", "latency"):
        c = own[("colocated", load)]
        pred[("colocated", load)] = c["gen"] + c["train"] + c["sync"]
        pred[("one_step_off", load)] = pred[("async", load)] = max(c["gen"], c["train"] + c["sync"])

    print(f"machine: {os.cpu_count()} cores; torch {torch.__version__}; ray {ray.__version__} "
          f"(init {ray_init_s:.1f} s)")
    print(f"\nweight sync, 1 trainer -> 2 rollout actors, median of {args.sync_reps}")
    print(f"{'payload':<10}{'MB':>7}{'transport':>14}{'sync s':>10}{'+digest s':>11}")
    for name in shapes:
        for transport in ("object_store", "gloo"):
            print(f"{name:<10}{mb[name]:>7.1f}{transport:>14}{sync[(name, transport, False)]:>10.4f}"
                  f"{sync[(name, transport, True)]:>11.4f}")
    print(f"\nGRPO step, gpt_mini default, B={args.prompts} x K={args.k} x {args.max_tokens} tokens, median of "
          f"{args.steps}; latency-bound = +{args.verify_s} s verify per batch; gen = rollout + verify, "
          "train = ref + train (medians of the run's own roles)")
    print(f"{'topology':<14}{'load':<9}{'step s':>8}{'gen s':>7}{'train s':>8}{'len':>6}{'pred own':>9}"
          f"{'meas/pred':>10}{'pred coloc':>11}{'speed-up':>9}{'stale':>6}")
    for key, (wall, rows) in steps.items():
        t, base = own[key], steps[("colocated", key[1])][0]
        st = max(r.get("system/staleness_max", 0.0) for r in rows)
        print(f"{key[0]:<14}{key[1]:<9}{wall:>8.3f}{t['gen']:>7.3f}{t['train']:>8.3f}{t['len']:>6.1f}"
              f"{pred_own[key]:>9.3f}{wall / pred_own[key]:>10.2f}{pred[key]:>11.3f}{base / wall:>8.2f}x{st:>6.0f}")
    print(json.dumps({
        "bench": "systems", "cores": os.cpu_count(), "threads_colocated": args.threads, "prompts": args.prompts,
        "k": args.k, "max_tokens": args.max_tokens, "verify_s": args.verify_s, "eta": args.eta, "steps": args.steps,
        "ray_init_s": round(ray_init_s, 2),
        "sync_s": {f"{n}/{t}" + ("/digest" if v else ""): round(x, 4) for (n, t, v), x in sync.items()},
        "payload_mb": {n: round(x, 1) for n, x in mb.items()},
        "step_s": {f"{t}/{lo}": round(w, 3) for (t, lo), (w, _) in steps.items()},
        "predicted_s": {f"{t}/{lo}": round(x, 3) for (t, lo), x in pred.items()},
        "predicted_own_s": {f"{t}/{lo}": round(x, 3) for (t, lo), x in pred_own.items()},
        "terms": {f"{t}/{lo}": {k: round(v, 3) for k, v in x.items() if "/" not in k} for (t, lo), x in own.items()},
        "speedup_vs_colocated": {f"{t}/{lo}": round(steps[("colocated", lo)][0] / w, 3)
                                 for (t, lo), (w, _) in steps.items()},
        "staleness_max": {f"{t}/{lo}": max(r.get("system/staleness_max", 0.0) for r in rows)
                          for (t, lo), (_, rows) in steps.items()}}))
    ray.shutdown()


if __name__ == "__main__":
    main()
