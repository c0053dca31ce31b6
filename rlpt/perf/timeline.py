"""A run's per-role timeline (lessons 19, 22a, 22c): when each role worked, step by step, from real timestamps.

    rlpt perf timeline runs/grpo_async [--steps 6]       -> runs/grpo_async/timeline.png and a table

Where the rows come from:
- a Ray run (rlpt/systems: disaggregated, one_step_off, async) logs `timeline/<role>_t0|t1` per step: when each
  rollout worker, the trainer and the sync started and ended, in seconds from the step's start. Overlap shows:
  in one_step_off and async the rollout workers' bars run beside the trainer's.
- an in-process (colocated) run logs only durations, `time/rollout|verify|ref|train|sync`; the controller runs
  them one after the other in that order (rlpt/framework/controller.py), so the bars are laid end to end.
- with the verifier dispatcher (`rollout.verify_workers` > 0, rlpt/framework/dispatch.py) the rollout also logs
  `verify/t0|t1`, when its pool handed out the first verify and returned the last verdict, in seconds from the
  rollout's start: a `verify` lane that overlaps the rollout's bar (`time/verify` is then only the wait after
  sampling ended). On Ray it is drawn from the first rollout worker's start (the workers' clocks averaged).

Steps are placed end to end at their measured length (`time/step` where logged, else the sum of the roles).
Beside the picture, the throughput equation (lesson 22a) on the same rows: a colocated step is the sum of its
terms, an overlapped one at best the max of its sides, max(rollout + verify, ref + train + sync); the measured
median step sits between the two, and where it sits says how much of the overlap the topology got.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SEQUENTIAL = ("rollout", "verify", "ref", "train", "sync")   # the controller's order within a step


@dataclass(frozen=True)
class Span:
    step: int
    role: str        # "rollout0" / "train" / "sync" (Ray) or one of SEQUENTIAL (in-process)
    start: float     # seconds from the first plotted step's start
    end: float


def step_spans(row: dict) -> list[tuple[str, float, float]]:
    """One metrics row -> [(role, t0, t1)] in seconds from the step's start: its `timeline/*` keys where it has
    them, else its `time/*` durations laid end to end in the controller's order."""
    marks = {k.removeprefix("timeline/"): v for k, v in row.items() if k.startswith("timeline/")}
    lane = (row["verify/t0"], row["verify/t1"]) if "verify/t0" in row and "verify/t1" in row else None
    if marks:
        roles = sorted({k.rsplit("_", 1)[0] for k in marks})
        out = [(r, marks[f"{r}_t0"], marks[f"{r}_t1"]) for r in roles if f"{r}_t0" in marks and f"{r}_t1" in marks]
        starts = [a for r, a, _ in out if r.startswith("rollout")]
        if lane and starts:
            out.append(("verify", min(starts) + lane[0], min(starts) + lane[1]))
        return out
    out, t = [], 0.0
    for role in SEQUENTIAL:
        d = row.get(f"time/{role}", 0.0)
        if role == "verify" and lane:          # the pool's lane beside the rollout; the step waited only `d`
            out.append((role, lane[0], lane[1]))
        elif d > 0:
            out.append((role, t, t + d))
        t += d
    return out


def step_length(row: dict, spans: list[tuple[str, float, float]]) -> float:
    return row.get("time/step") or max((e for _, _, e in spans), default=0.0)


def spans(rows: list[dict], last: int = 6) -> list[Span]:
    """The last `last` training steps (rows with per-role times) as spans on one clock, steps end to end."""
    steps = [r for r in rows if "time/train" in r or any(k.startswith("timeline/") for k in r)][-last:]
    out, t = [], 0.0
    for r in steps:
        s = step_spans(r)
        out += [Span(int(r.get("step", 0)), role, t + a, t + b) for role, a, b in s]
        t += step_length(r, s)
    return out


def equation(rows: list[dict]) -> dict:
    """Median measured step, and the throughput equation's sum (colocated) and max-of-sides (overlapped) on
    the median role times of the same rows."""
    steps = [r for r in rows if "time/train" in r]
    if not steps:
        return {}

    t = {k: _median([r.get(f"time/{k}", 0.0) for r in steps]) for k in SEQUENTIAL}
    measured = _median([step_length(r, step_spans(r)) for r in steps])
    return {"measured": measured, "sum": sum(t.values()),
            "max": max(t["rollout"] + t["verify"], t["ref"] + t["train"] + t["sync"]), **t}


def summary(sp: list[Span], eq: dict, rows: list[dict] | None = None) -> list[tuple[str, str]]:
    """The table beside the chart: each lane's busy seconds and share of the plotted span, the measured median
    step and the equation's sum and max; with the dispatcher, the verify pool's worker-seconds and timeouts."""
    busy: dict[str, float] = {}
    for s in sp:
        busy[s.role] = busy.get(s.role, 0.0) + s.end - s.start
    span = max(s.end for s in sp) - min(s.start for s in sp)
    out = [(role, f"{b:.3g} s busy ({b / span:.0%} of {span:.3g} s)") for role, b in busy.items()]
    if eq:
        out += [("median step, measured", f"{eq['measured']:.3g} s"),
                ("equation, colocated (sum of terms)", f"{eq['sum']:.3g} s"),
                ("equation, overlapped (max of sides)", f"{eq['max']:.3g} s")]
    pooled = [r for r in rows or [] if "verify/busy" in r]
    if pooled:
        out += [("verify pool, median worker-seconds per step", f"{_median([r['verify/busy'] for r in pooled]):.3g} s"),
                ("verify timeouts (reward 0), whole run", f"{sum(r.get('verify/timeouts', 0.0) for r in pooled):g}")]
    return out


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def plot(path: Path, sp: list[Span], title: str = "") -> Path:
    """A Gantt chart: one lane per role, a bar per (step, role), alternate steps shaded. Drawn here with
    matplotlib directly: rlpt.report imports this module for the run's report, so this one cannot import it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    roles = sorted({s.role for s in sp}, key=lambda r: (next((i for i, k in enumerate(SEQUENTIAL) if r.startswith(k)),
                                                             len(SEQUENTIAL)), r))   # the controller's order
    lanes = {r: i for i, r in enumerate(roles)}
    colors = {"rollout": "tab:blue", "verify": "tab:orange", "ref": "tab:purple", "train": "tab:red",
              "sync": "tab:green"}
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(roles)))
    try:
        for s in sp:
            c = next((v for k, v in colors.items() if s.role.startswith(k)), "tab:gray")
            ax.barh(lanes[s.role], s.end - s.start, left=s.start, color=c, alpha=0.85 if s.step % 2 else 0.55)
        ax.set_yticks(range(len(roles)), roles)
        ax.invert_yaxis()
        ax.set_xlabel("seconds")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
