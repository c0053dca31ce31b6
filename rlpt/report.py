"""End-of-run output: a summary table on the terminal, and report.md with plots in the run folder.

    write_report(run, "SFT", final_metrics, plots={"accuracy": ["acc/heldout"], "loss": ["loss/sft"]})

A run whose steps logged per-role times (every `rlpt train` topology: colocated's `time/*`, the Ray topologies'
`timeline/*`, the verifier pool's `verify/t0|t1`) also gets its timeline: the Gantt chart of the last steps
(`timeline.png`, rlpt/perf/timeline.py, lessons 19 and 22a) with each role's busy share, the measured median
step and the throughput equation's sum (one role at a time) and max of sides (overlapped) beside it.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


def machine() -> str:
    """The CPU a result was measured on, for every results page: model name, the vector units MKL picks
    kernels by (AVX2 / AVX-512 / AMX: they change float results, hence training paths), cores, torch threads."""
    import os

    import torch
    name, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, val = line.partition(":")
            if key.strip() == "model name":
                name = val.strip()
            elif key.strip() == "flags":
                flags = set(val.split())
                break
    except OSError:
        pass
    units = [u for u, f in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AMX", "amx_tile")) if f in flags]
    return (f"{name} ({', '.join(units) or 'no AVX2'}), {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch thread{'s' if torch.get_num_threads() > 1 else ''}")


def table(rows: list[tuple[str, str]], headers: tuple[str, str] = ("metric", "value")) -> str:
    """A markdown table (also readable as plain text on a terminal)."""
    w0 = max(len(headers[0]), *(len(r[0]) for r in rows)) if rows else len(headers[0])
    w1 = max(len(headers[1]), *(len(r[1]) for r in rows)) if rows else len(headers[1])
    lines = [f"| {headers[0]:<{w0}} | {headers[1]:>{w1}} |", f"|{'-' * (w0 + 2)}|{'-' * (w1 + 1)}:|"]
    lines += [f"| {a:<{w0}} | {b:>{w1}} |" for a, b in rows]
    return "\n".join(lines)


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@contextmanager
def figure(path: Path, size: tuple[float, float] = (6.5, 3.8), ncols: int = 1, dpi: int = 100):
    """A headless matplotlib figure written to `path` when the block ends (gridded, tight layout) and
    always closed:  `with figure(p) as ax: ax.plot(...)`  (ncols > 1 gives an array of axes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, ncols, figsize=size)
    try:
        yield ax
        for a in (ax if ncols > 1 else [ax]):
            a.grid(alpha=0.3)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def plot_series(metrics: list[dict], keys: list[str], path: Path, title: str = "") -> Path | None:
    """Plot each key against step (points where the key was logged). None when nothing to plot."""
    series = {k: [(r["step"], r[k]) for r in metrics if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    with figure(path, size=(6, 3.5)) as ax:
        for k, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None, label=k)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
    return path


def write_report(run, title: str, final: dict, plots: dict[str, list[str]], notes: str = "") -> Path:
    metrics = run.read_metrics()
    parts = [f"# {title}: {run.dir.name}", "", f"Measured on {machine()}.", "",
             table([(k, fmt(v)) for k, v in final.items()]), ""]
    for name, keys in plots.items():
        png = plot_series(metrics, keys, run.dir / f"{name}.png", title=name)
        if png is not None:
            parts += [f"![{name}]({png.name})", ""]
    parts += timeline_section(run.dir, metrics)
    if notes:
        parts += [notes, ""]
    path = run.dir / "report.md"
    path.write_text("\n".join(parts))
    return path


def timeline_section(run_dir: Path, rows: list[dict], steps: int = 6) -> list[str]:
    """The report's timeline: `timeline.png` of the last `steps` steps and its table (markdown lines); none for a
    run without per-role times (SFT, DPO). `rlpt perf timeline RUN` draws the same chart for any run folder."""
    from rlpt.perf import timeline
    sp = timeline.spans(rows, steps)
    if not sp:
        return []
    n = len({s.step for s in sp})
    png = timeline.plot(Path(run_dir) / "timeline.png", sp, f"{Path(run_dir).name}: last {n} steps")
    return [f"## Timeline: the last {n} steps, role by role", "", f"![timeline]({png.name})", "",
            table(timeline.summary(sp, timeline.equation(rows), rows), ("role / step", "seconds")), "",
            "Colocated runs one role at a time, so its step is the equation's sum; an overlapped topology (Ray's "
            "one_step_off / async, or the verifier pool beside the sampler) approaches the max of its sides.", ""]


# RL runs (rlpt.train): shown on the progress bar each step, and averaged over the last 10 steps in the end-of-run table
PROGRESS = ("reward/mean", "acc/heldout", "loss", "kl/mean", "grad/norm", "clip/frac")
LAST10 = ("reward/mean", "loss", "loss/pg", "loss/kl", "loss/value", "kl/mean", "grad/norm", "grad/norm_critic",
          "clip/frac", "clip/frac_low", "clip/frac_high", "policy/entropy", "response/len_mean",
          "groups/degenerate_frac", "sampling/groups_drawn", "sampling/cap_hit")


def summarize(rows: list[dict]) -> dict:
    """An RL run's end-of-run summary from its metrics rows: held-out accuracy at start, end and best, each
    LAST10 key averaged over the last 10 steps that logged it, skipped steps and the median step time."""
    acc = [(r["step"], r["acc/heldout"]) for r in rows if "acc/heldout" in r]
    steps = [r for r in rows if "reward/mean" in r]
    out = {"acc/heldout_start": acc[0][1], "acc/heldout_final": acc[-1][1],
           "acc/heldout_best": max(a for _, a in acc)}
    honest = [r["acc/heldout_honest"] for r in rows if "acc/heldout_honest" in r]
    if honest:
        out |= {"acc/heldout_honest_start": honest[0], "acc/heldout_honest_final": honest[-1]}
    if steps:
        for k in LAST10:   # over the last 10 steps that logged k (a skipped step logs no loss)
            vals = [r[k] for r in steps if k in r][-10:]
            if vals:
                out[f"{k}_last10"] = sum(vals) / len(vals)
        out["steps/skipped"] = sum(r.get("step/skipped", 0) for r in steps)
        roles = ("time/rollout", "time/verify", "time/ref", "time/train", "time/sync")
        out["time/step_median"] = _median([sum(r.get(k, 0.0) for k in roles) for r in steps])
    return out


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0
