"""`rlpt compare`: the algorithms side by side, from one SFT start, one seed and one step budget.

    rlpt compare recipes/grpo_arith.yaml [--algos reinforce,ppo,...] [key=value ...]

Every algorithm (default: all registered, in lineage order) becomes an ordinary `rlpt train` run
folder, runs/<name>/<algo>/, built the way `rlpt train algorithm.name=<algo>` builds it: the algorithm's
own defaults (`trainer_defaults`; PPO: trainer.epochs=4), then the recipe, then the overrides, which win. A
`run.name=` override names the comparison ("compare" without one: the recipe's run name is one
run's). The SFT start is resolved once (`init_from`, or trained into runs/<name>/sft/) and written
into every run's config as its `init_from`, so all start from the same weights. The recipe's
algorithm keys go to the algorithms that have them (`clip_eps` to PPO and the GRPO family, not to
REINFORCE or RLOO; the skipped ones are listed); a key that no registered algorithm knows is an error.

Written to runs/<name>/: compare.md and compare.json (one row per algorithm: final and best held-out
accuracy, steps and seconds to first reach `target` held-out, peak memory, mean response length,
wall seconds) and heldout_accuracy.png (held-out accuracy against step, one line per algorithm).

Peak memory is measured per run by running each algorithm in its own Python process
(`python -m rlpt.compare JOB.json RESULT.json`, which calls rlpt.train.run_train). Just before
run_train (interpreter, torch, rlpt and TensorBoard imported) the child resets its resident-set
high-water mark to its current RSS (Linux: `5 > /proc/self/clear_refs`) and notes that RSS; at the
end it reads the mark (VmHWM). The row gives that peak, and in brackets its rise over the RSS at the
start: what the run itself added (weights, optimizer state, critic, activations, rollout buffers).
Not getrusage's ru_maxrss: after fork + exec it also holds the parent's high-water mark (here the
parent that trained the SFT start), and in one shared process the mark only rises, so each run would
inherit the largest earlier one; torch's CPU allocator keeps no peak statistics and tracemalloc does
not see its allocations. RSS is what the OS holds for the process (allocator caches included), an
upper bound on tensor bytes, not a count of them. Where /proc is missing, ru_maxrss is used and the
method says so in compare.json.

Times: "wall s" is run_train in the child, call to return (build, step-0 eval, steps, evals,
checkpoints; not the ~3 s of process start). "s to target" is the run's own loop clock
(`time/elapsed`, which starts after the step-0 eval) at the first eval that reached the target.
"""
from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlpt.algorithms import LINEAGE
from rlpt.checkpoint import CheckpointError, resolve_checkpoint
from rlpt.config import ConfigError, parse_override, read_yaml
from rlpt.framework.algorithm import ALGORITHMS
from rlpt.framework.controller import LogpMismatchError
from rlpt.report import figure
from rlpt.run import RunFolderError
from rlpt.train import TrainJob, load_train_job, sft_init, summarize

TARGET = 0.8

# A child's error that the CLI reports as the user's (exit 2; LogpMismatchError 3), most specific first: it travels
# as the name of the first of these it is an instance of, so a subclass comes back as its kind, never RuntimeError
USER_ERRORS = (ConfigError, CheckpointError, RunFolderError, FileExistsError, LogpMismatchError)
MEMORY_METHOD = ("peak RSS = high-water mark (VmHWM) of a separate process per algorithm, reset just before "
                 "run_train; (+x) = its rise over the RSS at that moment (python, torch, rlpt imported)")


# -- which algorithms, and how each is configured ------------------------------------------------
def parse_algos(spec: str | None) -> list[str]:
    """'ppo,grpo' -> ['ppo', 'grpo']; None or '' -> every registered algorithm, in lesson order
    (rlpt.algorithms.LINEAGE: reinforce, ppo, grpo, rloo, dapo, drgrpo), then any others as registered."""
    names = [a for a in LINEAGE if a in ALGORITHMS] + [a for a in ALGORITHMS if a not in LINEAGE]
    if not spec:
        return names
    out: list[str] = []
    for a in (s.strip() for s in spec.split(",")):
        if a and a not in ALGORITHMS:
            close = difflib.get_close_matches(a, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown algorithm '{a}' in --algos.{hint} Registered: {', '.join(names)}")
        if a and a not in out:
            out.append(a)
    if not out:
        raise ConfigError(f"--algos names no algorithm; registered: {', '.join(names)}")
    return out


def take_algos(items: list[str], algos: str | None = None) -> tuple[list[str], str | None]:
    """Pull `--algos a,b` / `--algos=a,b` out of the command line's items: argparse takes options only
    before the first positional, and the usage puts --algos after the recipe."""
    rest, it = [], iter(items)
    for x in it:
        if x == "--algos":
            algos = next(it, None)
            if algos is None:
                raise ConfigError("--algos needs a value, e.g. --algos ppo,grpo")
        elif x.startswith("--algos="):
            algos = x.split("=", 1)[1]
        elif x.startswith("-"):
            raise ConfigError(f"unknown option {x!r} for rlpt compare (it takes --algos a,b,... only)")
        else:
            rest.append(x)
    return rest, algos


def build_jobs(path: str | None, overrides: list[str], algos: list[str]) -> tuple[str, dict[str, TrainJob], dict]:
    """-> (compare name, {algo: its TrainJob}, {algo: recipe algorithm keys it does not have}).
    Each job is `rlpt train`'s for that algorithm (rlpt.train.load_train_job: its own defaults beneath the
    recipe and the overrides). Jobs keep the user's run.out_dir; run.name and init_from are set by run_compare."""
    recipe = read_yaml(path) if path else {}
    known = set().union(*(cls.Config.model_fields for cls in ALGORITHMS.values()))
    name = "compare"
    section = {k: v for k, v in (recipe.get("algorithm") or {}).items() if k != "name"}
    rest = []
    for item in overrides:
        keys, value = parse_override(item)
        if keys == ["run", "name"]:
            name = str(value)
        elif keys[0] == "algorithm":
            if keys[1:] == ["name"]:
                raise ConfigError("rlpt compare: choose the algorithms with --algos a,b,..., not algorithm.name")
            section[".".join(keys[1:])] = value
        else:
            rest.append(item)
    for k in section:
        if k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f" Did you mean 'algorithm.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key 'algorithm.{k}': no registered algorithm has it.{hint}")
    jobs, skipped = {}, {}
    for algo in algos:
        fields = ALGORITHMS[algo].Config.model_fields
        skipped[algo] = sorted(k for k in section if k not in fields)
        base = {**recipe, "algorithm": {"name": algo, **{k: v for k, v in section.items() if k in fields}}}
        try:
            jobs[algo] = load_train_job(None, rest, base=base)
        except ConfigError as e:
            raise ConfigError(f"{algo} (recipe {path or 'none'}): {e}") from None
    return name, jobs, skipped


# -- the numbers ---------------------------------------------------------------------------------
def steps_to_target(rows: list[dict], target: float = TARGET, key: str = "acc/heldout") -> tuple[int, float] | None:
    """(step, seconds) of the first logged eval with key >= target, or None. Seconds come from the
    loop clock `time/elapsed`; the step-0 eval (logged before the loop starts) counts as 0 s."""
    for r in rows:
        if r.get(key) is not None and r[key] >= target:
            return int(r["step"]), float(r.get("time/elapsed", 0.0))
    return None


def run_row(algo: str, rows: list[dict], result: dict, target: float = TARGET) -> dict:
    s = summarize(rows)
    reach = steps_to_target(rows, target)
    lens = [r["response/len_mean"] for r in rows if "response/len_mean" in r]
    return {"algorithm": algo, "acc_start": s["acc/heldout_start"], "acc_final": s["acc/heldout_final"],
            "acc_best": s["acc/heldout_best"], "steps_to_target": reach[0] if reach else None,
            "seconds_to_target": reach[1] if reach else None,
            "rss_peak_mib": result["rss_peak_kib"] / 1024,
            "rss_rise_mib": (result["rss_peak_kib"] - result["rss_base_kib"]) / 1024,
            "response_len_mean": sum(lens) / len(lens) if lens else None, "wall_s": result["wall_s"],
            "steps": max(r["step"] for r in rows)}


def markdown(rows: list[dict], target: float = TARGET) -> str:
    pct = f"{target:.0%}"
    heads = ["algorithm", "final acc", "best acc", f"steps to {pct}", f"s to {pct}", "peak RSS MiB (+rise)",
             "mean resp len", "wall s"]
    dash = "—"
    cells = [[r["algorithm"], f"{r['acc_final']:.3f}", f"{r['acc_best']:.3f}",
              dash if r["steps_to_target"] is None else str(r["steps_to_target"]),
              dash if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}",
              f"{r['rss_peak_mib']:.0f} (+{r['rss_rise_mib']:.0f})",
              dash if r["response_len_mean"] is None else f"{r['response_len_mean']:.1f}", f"{r['wall_s']:.1f}"]
             for r in rows]
    w = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]

    def line(cs: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(cs)) + " |"
    return "\n".join([line(heads), "|" + "|".join("-" * (w[0] + 2) if i == 0 else "-" * (w[i] + 1) + ":"
                                                   for i in range(len(w))) + "|", *map(line, cells)])


def plot_heldout(curves: dict[str, list[tuple[int, float]]], path: Path, target: float = TARGET) -> Path:
    """Held-out accuracy against step, every algorithm on one axis (rlpt.report.plot_series' style)."""
    with figure(path, size=(6, 3.5)) as ax:
        for algo, pts in curves.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None, label=algo)
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out accuracy")
        ax.set_title("held-out accuracy (greedy)")
        ax.legend(fontsize=8)
    return path


# -- running -------------------------------------------------------------------------------------
def run_isolated(job: TrainJob) -> dict:
    """run_train(job) in a fresh Python process; -> {wall_s, rss_base_kib, rss_peak_kib, memory_method}.
    A failure comes back as the kind of user error it is (`USER_ERRORS`, exit 2 / 3 in the CLI), else RuntimeError."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                    os.environ.get("PYTHONPATH")])))
    if job.run.threads:
        env["OMP_NUM_THREADS"] = str(job.run.threads)
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        spec.write_text(job.model_dump_json())
        proc = subprocess.run([sys.executable, "-m", "rlpt.compare", str(spec), str(out)], env=env, check=False)
        result = json.loads(out.read_text()) if out.exists() else {}
    if proc.returncode == 0 and "wall_s" in result:
        return result
    known = {c.__name__: c for c in USER_ERRORS}
    msg = f"{job.algorithm.name}: {result.get('error', f'its process exited with {proc.returncode}; see above')}"
    raise known.get(result.get("error_type"), RuntimeError)(msg)


def run_compare(path: str | None, overrides: list[str], algos: str | list[str] | None = None,
                target: float = TARGET) -> tuple[Path, list[dict]]:
    import torch
    algos = parse_algos(",".join(algos) if isinstance(algos, list) else algos)
    name, jobs, skipped = build_jobs(path, overrides, algos)
    first = jobs[algos[0]]
    out = Path(first.run.out_dir) / name
    for algo in algos:   # fail before any training, not after the first runs
        if (out / algo / "checkpoints" / "latest").exists():
            raise FileExistsError(f"{str(out / algo)!r} already holds a run; choose another run.name=<new name> "
                                  "for this comparison (nothing was changed)")
    if first.run.threads:
        torch.set_num_threads(first.run.threads)
    torch.manual_seed(first.run.seed)
    sft = resolve_checkpoint(sft_init(first.model_copy(update={"run": first.run.model_copy(update={"name": name})}),
                                      resume=False))
    for algo, keys in skipped.items():
        if keys:
            print(f"[rlpt] compare: {algo} has no " + ", ".join(f"algorithm.{k}" for k in keys) + " (not applied)")
    rows, curves, methods = [], {}, []
    for i, algo in enumerate(algos, 1):
        job = jobs[algo]
        job = job.model_copy(update={"run": job.run.model_copy(update={"out_dir": str(out), "name": algo}),
                                     "init_from": str(sft)})
        print(f"[rlpt] compare: {algo} ({i}/{len(algos)}), {job.steps} steps from {sft}", flush=True)
        result = run_isolated(job)
        metrics = [json.loads(line) for line in (out / algo / "metrics.jsonl").read_text().splitlines() if line]
        rows.append(run_row(algo, metrics, result, target))
        methods.append(result["memory_method"])
        r = rows[-1]
        print(f"[rlpt] compare: {algo}: held-out {r['acc_start']:.3f} -> {r['acc_final']:.3f} "
              f"(best {r['acc_best']:.3f}) in {r['wall_s']:.0f} s", flush=True)
        curves[algo] = [(r["step"], r["acc/heldout"]) for r in metrics if "acc/heldout" in r]
    plot_heldout(curves, out / "heldout_accuracy.png", target)
    table = markdown(rows, target)
    memory = MEMORY_METHOD if all(m == "VmHWM" for m in methods) else "peak RSS = ru_maxrss of each run's process"
    command = " ".join(["rlpt compare", *([path] if path else []),
                        *([] if algos == list(ALGORITHMS) else ["--algos", ",".join(algos)]), *overrides])
    setup = (f"{len(algos)} algorithms, {first.steps} steps each, seed {first.run.seed}, from the SFT start "
             f"`{sft}` (held-out {rows[0]['acc_start']:.3f}).")
    skipped = {a: k for a, k in skipped.items() if k}
    notes = [f"    {command}", "", setup, "", table, "", f"Memory: {memory}."]
    if skipped:
        notes.append("Recipe keys an algorithm does not have (not applied to it): " + "; ".join(
            f"{a}: " + ", ".join(f"algorithm.{k}" for k in keys) for a, keys in skipped.items()) + ".")
    notes += ["", "![held-out accuracy](heldout_accuracy.png)", ""]
    (out / "compare.json").write_text(json.dumps(
        {"name": name, "command": command, "recipe": path, "overrides": overrides, "algorithms": algos,
         "sft_start": str(sft), "target": target, "steps": first.steps, "seed": first.run.seed,
         "memory_method": memory, "skipped_algorithm_keys": skipped, "rows": rows}, indent=1))
    (out / "compare.md").write_text("\n".join([f"# rlpt compare: {name}", "", *notes]))
    return out, rows


def _memory_kib(reset: bool = False) -> tuple[int, int, str]:
    """-> (resident KiB now, high-water KiB, method); with reset, the high-water mark restarts from now."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0]), "VmHWM"
    except OSError:   # no /proc (macOS) or not writable: the process's ru_maxrss, never reset
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
        return peak, peak, "ru_maxrss"


def _child(job_path: str, result_path: str) -> int:
    """One algorithm's run, alone in this process, reporting its wall time and memory."""
    import traceback

    import torch.utils.tensorboard  # noqa: F401 - every run logs to TensorBoard: imported before the baseline

    from rlpt.train import run_train
    job = TrainJob.model_validate_json(Path(job_path).read_text())
    base, _, method = _memory_kib(reset=True)
    t0 = time.perf_counter()
    try:
        run_train(job)
    except Exception as e:   # noqa: BLE001 - reported to the parent, which re-raises it by type
        if not isinstance(e, USER_ERRORS):
            traceback.print_exc()
        kind = next((c for c in USER_ERRORS if isinstance(e, c)), type(e))
        Path(result_path).write_text(json.dumps({"error": str(e), "error_type": kind.__name__}))
        return 1
    wall = time.perf_counter() - t0
    _, peak, _ = _memory_kib()
    Path(result_path).write_text(json.dumps({"wall_s": wall, "rss_base_kib": base, "rss_peak_kib": peak,
                                             "memory_method": method}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("python -m rlpt.compare JOB.json RESULT.json is rlpt compare's per-algorithm worker; "
                 "run `rlpt compare [recipe.yaml] [--algos a,b] [key=value ...]`")
    sys.exit(_child(sys.argv[1], sys.argv[2]))
