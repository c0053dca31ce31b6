"""rlpt lab: how soon `rlpt lab` answers after start, and each widget's latency over HTTP (lesson pages' knobs).

    time to first answer = Popen(`rlpt lab`) -> first 200 on GET /  (the issue's bar: <= 3 s)
    widget latency       = GET /w/<slug>?<random knobs in the course's ranges>, p50 / p95 per widget after one
                           warm-up request (the first use of a widget imports its rlpt modules, torch for some)
    calculators          = the widgets whose compute is a formula; the bar: p95 <= 300 ms. Simulations (KIND =
                           "simulation": a loop of training steps, e.g. DPO's 300 Adam steps) are reported apart

Against a real server (uvicorn, one process, loopback), seeded knobs. Prints a table, then one JSON line.

    python bench/lab.py [--requests 30] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import typing

import httpx

from rlpt.lab.lessons import LESSONS
from rlpt.lab.widgets import bounds, load


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int) -> tuple[subprocess.Popen, float]:
    """Start the server; -> (process, seconds until GET / answered 200)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.perf_counter() - t0 < 60:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.TransportError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd)} did not answer within 60 s")


def random_knobs(model, rng: random.Random) -> dict[str, str]:
    out = {}
    for key, f in model.model_fields.items():
        if f.annotation is bool:
            out[key] = rng.choice(["true", "false"])
        elif f.annotation is str:
            out[key] = rng.choice([f.default, f.default[::-1], "12#", "120#"])
        elif typing.get_origin(f.annotation) is typing.Literal:
            out[key] = rng.choice(typing.get_args(f.annotation))
        else:
            lo, hi = bounds(model, key)
            out[key] = str(rng.randint(int(lo), int(hi)) if f.annotation is int else round(rng.uniform(lo, hi), 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    runs = tempfile.mkdtemp()
    starts = {}
    for label, cmd in [("rlpt lab", [sys.executable, "-c", "from rlpt.cli import main; raise SystemExit(main())"]),
                       ("python -m rlpt.lab.cli", [sys.executable, "-m", "rlpt.lab.cli"])]:
        port = free_port()
        proc, dt = start([*cmd, *(["lab"] if label == "rlpt lab" else []), "--port", str(port), "--runs", runs], port)
        starts[label] = dt
        if label == "rlpt lab":
            keep, keep_port = proc, port
        else:
            proc.terminate()
            proc.wait()
    rng = random.Random(args.seed)
    base = f"http://127.0.0.1:{keep_port}"
    rows, calc, sims = [], [], []
    try:
        with httpx.Client(base_url=base, timeout=60) as c:
            for lesson in LESSONS:
                if not lesson.widget:
                    continue
                mod = load(lesson.widget)
                model, kind = mod.Knobs, getattr(mod, "KIND", "calculator")
                t0 = time.perf_counter()
                c.get(f"/w/{lesson.slug}").raise_for_status()        # warm-up: the widget's first use
                first = time.perf_counter() - t0
                lat, refused = [], 0
                for _ in range(args.requests):
                    t0 = time.perf_counter()
                    r = c.get(f"/w/{lesson.slug}", params=random_knobs(model, rng))
                    if r.status_code != 200:
                        refused += 1
                        continue
                    lat.append(time.perf_counter() - t0)
                if not lat:   # every random setting refused (too long a run): nothing to time
                    rows.append({"lesson": lesson.slug, "widget": lesson.widget, "kind": kind,
                                 "first_s": round(first, 3), "p50_ms": None, "p95_ms": None, "refused": refused})
                    continue
                p50 = statistics.median(lat)
                p95 = statistics.quantiles(lat, n=20)[18] if len(lat) >= 2 else lat[0]
                rows.append({"lesson": lesson.slug, "widget": lesson.widget, "kind": kind, "first_s": round(first, 3),
                             "p50_ms": round(1000 * p50, 1), "p95_ms": round(1000 * p95, 1), "refused": refused})
                (calc if kind == "calculator" else sims).extend(lat)
    finally:
        keep.terminate()
        keep.wait()
    calc_p95 = statistics.quantiles(calc, n=20)[18]
    sims_p95 = statistics.quantiles(sims, n=20)[18] if len(sims) >= 2 else 0.0
    print(f"{'lesson':>6}  {'widget':<20} {'kind':<10} {'first use':>9}  {'p50':>9}  {'p95':>9}  refused")
    for r in rows:
        p50, p95 = (f"{r[k]:>7.1f}ms" if r[k] is not None else f"{'-':>9}" for k in ("p50_ms", "p95_ms"))
        print(f"{r['lesson']:>6}  {r['widget']:<20} {r['kind']:<10} {r['first_s']:>8.2f}s  {p50}  {p95}  "
              f"{r['refused']}")
    for label, dt in starts.items():
        print(f"time to first answer, {label}: {dt:.2f} s")
    print(f"calculator widgets, p95 over {len(calc)} requests: {1000 * calc_p95:.1f} ms")
    print(f"simulation widgets, p95 over {len(sims)} requests: {1000 * sims_p95:.1f} ms")
    first = {k: round(v, 2) for k, v in starts.items()}
    print(json.dumps({"bench": "lab", "cpu": cpu_name(), "cores": os.cpu_count(),
                      "requests_per_widget": args.requests, "first_answer_s": first,
                      "calculator_p95_ms": round(1000 * calc_p95, 1), "simulation_p95_ms": round(1000 * sims_p95, 1),
                      "widgets": rows}))


if __name__ == "__main__":
    main()
