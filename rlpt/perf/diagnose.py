"""`rlpt diagnose RUN`: lesson 23's failure-mode taxonomy and lesson 28's playbook, read off a run folder.

    rows = read_metrics(run_dir);  findings = diagnose(rows, run_config(run_dir))
    each Finding: name, severity (severe | warning | info), evidence (the numbers), the lesson to read, a fix

What each check reads (metric names as the controller and trainer log them):
    reward hacking       reward/mean up while the honest held-out accuracy (acc/heldout_honest) falls, or the gap
                         between the verifier's reward and the honest check on the same samples (acc/train) opens
    stale sync           median |log ρ| (ratio/abs_log_mean) > 0.05 on stale batches and 1.5x the fresh ones'
                         (sync/done); without stale batches, clip/frac > 30 % or |log ρ| > 0.05 is "ratio drift"
    length drift         response/len_mean moving by half its start, or most answers cut at max_tokens
    entropy collapse     policy/entropy falling by over 70 % from where it started
    KL spike             kl/mean jumping to 5× its running median
    empty groups         groups/signal_frac (groups with unequal rewards) below 0.3: nothing to learn from
    NaN risk             step/nonfinite > 0, a first-step ρ far from 1 (ratio/p05, ratio/p95), grad-norm outliers
    DPO displacement     logp/chosen and logp/rejected both falling (lesson 16)
    time shares          time/<role> against lesson 28's typical split, and lesson 28's allocator fed with the
                         measured split: the optimisation that would pay most

A run is compared with itself (its first third against its last third), so the thresholds are scale-free where
they can be; the absolute ones are the course's (clip 30 %, |log ρ| 0.05). Pure python: no torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rlpt.config import ConfigError
from rlpt.perf.throughput import TYPICAL_RANGES, RoleTimes, gain_of_each

SEVERITIES = ("severe", "warning", "info")
ROLE_KEYS = ("rollout", "verify", "ref", "train", "sync")


@dataclass
class Finding:
    name: str
    severity: str
    evidence: str
    lesson: str
    fix: str = ""
    keys: list[str] = field(default_factory=list)   # the metrics that show it, plotted in the report


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl: give a run folder (e.g. runs/grpo)")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) where `key` was logged as a finite number."""
    return [(r["step"], float(r[key])) for r in rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _ends(rows: list[dict], key: str) -> tuple[float, float] | None:
    """Mean of the first and of the last third of a metric (at least one point each); None if under 2 points."""
    v = [x for _, x in series(rows, key)]
    if len(v) < 2:
        return None
    n = max(1, len(v) // 3)
    return _mean(v[:n]), _mean(v[-n:])


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


# -- the checks: each returns a Finding or None ------------------------------------------------------------
def reward_hacking(rows: list[dict], cfg: dict) -> Finding | None:
    reward, train_acc = _ends(rows, "reward/mean"), _ends(rows, "acc/train")
    honest_key = "acc/heldout_honest" if series(rows, "acc/heldout_honest") else "acc/heldout"
    held = [x for _, x in series(rows, honest_key)]
    evidence = []
    if reward and len(held) >= 2:
        up, down = reward[1] - reward[0], held[0] - _mean(held[-2:])
        if up >= 0.05 and down >= 0.05:
            evidence.append(f"train reward {reward[0]:.3f} → {reward[1]:.3f} while held-out ({honest_key}) "
                            f"{held[0]:.3f} → {_mean(held[-2:]):.3f}")
    if reward and train_acc:
        gap0, gap1 = reward[0] - train_acc[0], reward[1] - train_acc[1]
        if gap1 - gap0 >= 0.15 and train_acc[1] <= train_acc[0]:
            evidence.append(f"the verifier pays {gap1:.3f} more than the honest check on the same samples "
                            f"(reward/mean − acc/train, was {gap0:.3f})")
    if not evidence:
        return None
    return Finding("reward hacking", "severe", "; ".join(evidence), "lesson 18 (verifiers), lesson 23",
                   "audit the verifier (env.name=" + str((cfg.get("env") or {}).get("name", "?")) + "); hold out a "
                   "stricter check; trust held-out accuracy, not the training reward",
                   ["reward/mean", "acc/train", "acc/heldout", "acc/heldout_honest"])


def staleness(rows: list[dict]) -> list[tuple[int, int, float]]:
    """(step, s, mean |log ρ|) per trained step, s = train steps since the rollout's weights were last synced
    (from `sync/done`): 0 when the batch was sampled from the weights the trainer starts the step with."""
    out, s = [], 0
    for r in rows:
        if "sync/done" not in r:
            continue
        if isinstance(r.get("ratio/abs_log_mean"), (int, float)):
            out.append((r["step"], s, float(r["ratio/abs_log_mean"])))
        s = 0 if r["sync/done"] else s + 1
    return out


def stale_sync(rows: list[dict], cfg: dict) -> Finding | None:
    """Lesson 22c's tell: |log ρ| grows with the age of the rollout's weights. Rows sampled s ≥ 1 syncs late
    are compared with fresh ones (s = 0); without stale rows, a large ρ drift within each step (lr, epochs,
    mini-batches) is reported as "ratio drift" instead."""
    clip = [x for _, x in series(rows, "clip/frac")]
    st = staleness(rows)
    if not st and not clip:
        return None
    every = int((cfg.get("sync") or {}).get("every", 1))
    fresh, stale = [x for _, s, x in st if s == 0], [x for _, s, x in st if s > 0]
    clip_med = _median(clip) if clip else 0.0
    # medians, not means: a run has few fresh batches (one per sync), and one spike among them (a blow-up step)
    # hid the staleness of a sync.every=8 run at one seed in five
    f_med, s_med = _median(fresh) if fresh else 0.0, _median(stale) if stale else 0.0
    clip_txt = f"clip/frac median {clip_med:.1%} (healthy < 5 %, broken > 25–30 %)"
    if stale and s_med > 0.05 and s_med > 1.5 * f_med:
        by_age = {}
        for _, s, x in st:
            by_age.setdefault(s, []).append(x)
        ages = ", ".join(f"{s}: {_mean(v):.3f}" for s, v in sorted(by_age.items())[:8])
        return Finding("stale sync", "severe", f"median |log ρ| {s_med:.3f} on batches sampled by rollout weights 1+ "
                       f"updates behind against {f_med:.3f} on fresh ones (healthy < 0.05), growing with the age "
                       f"(age: |log ρ| = {ages}); {clip_txt}; sync.every={every}",
                       "lesson 22c (async and the freshness wall), lesson 06",
                       "sync every step (sync.every=1) or bound the staleness", ["clip/frac", "ratio/abs_log_mean"])
    drift = _median([x for _, _, x in st]) if st else 0.0
    lr = ((cfg.get("trainer") or {}).get("optim") or {}).get("lr", "?")
    if clip_med > 0.30 or drift > 0.05:
        return Finding("ratio drift", "severe" if clip_med > 0.30 else "warning",
                       f"{clip_txt}, mean |log ρ| median {drift:.3f} (healthy < 0.05) on fresh batches: each step's "
                       "own updates move the policy that far (lr, epochs, mini_batches), or the log-probs disagree",
                       "lesson 22c, lesson 06 (the ratio and the clip)",
                       f"lower the lr (trainer.optim.lr={lr}) or the updates per batch",
                       ["clip/frac", "ratio/abs_log_mean"])
    return None


def length_drift(rows: list[dict], cfg: dict) -> Finding | None:
    ends, cut = _ends(rows, "response/len_mean"), _ends(rows, "response/truncated_frac")
    if not ends or ends[0] <= 0:
        return None
    rel = ends[1] / ends[0]
    cap = (cfg.get("rollout") or {}).get("max_tokens", "?")
    if 0.5 < rel < 1.5 and not (cut and cut[1] > 0.5 and cut[1] - cut[0] > 0.2):
        return None
    trunc = f"; cut at max_tokens={cap}: {cut[0]:.1%} → {cut[1]:.1%}" if cut else ""
    return Finding("length drift", "warning", f"mean response length {ends[0]:.1f} → {ends[1]:.1f} tokens "
                   f"(×{rel:.2f}){trunc}", "lesson 14 (length bias: seq-mean-token-mean, Dr.GRPO), lesson 13 (DAPO)",
                   "compare loss_agg modes (seq-mean-token-sum-norm removes the 1/|y| bias); a soft overlong penalty",
                   ["response/len_mean", "len/p90", "response/truncated_frac"])


def entropy_collapse(rows: list[dict], cfg: dict) -> Finding | None:
    ends = _ends(rows, "policy/entropy")
    if not ends or ends[0] <= 0 or ends[1] >= 0.3 * ends[0]:
        return None
    return Finding("entropy collapse", "severe", f"policy entropy {ends[0]:.3f} → {ends[1]:.3f} nats per token "
                   f"(×{ends[1] / ends[0]:.2f}): sampling has become nearly deterministic, exploration is gone",
                   "lesson 13 (DAPO's clip-higher), lesson 27 (entropy regularisation)",
                   f"lower the lr (trainer.optim.lr={((cfg.get('trainer') or {}).get('optim') or {}).get('lr', '?')}), "
                   "raise clip_eps_high, or add an entropy bonus", ["policy/entropy"])


def kl_spike(rows: list[dict], cfg: dict) -> Finding | None:
    kl = series(rows, "kl/mean")
    for i in range(5, len(kl)):
        base = _median([x for _, x in kl[:i]])
        step, x = kl[i]
        if x > 5 * base and x > 0.05:
            return Finding("KL spike", "warning", f"kl/mean {x:.3g} at step {step}, {x / max(base, 1e-12):.0f}× its "
                           f"running median {base:.3g}", "lesson 03 (KL), lesson 20 (rollout numerics), lesson 23",
                           "raise β, check the reference is frozen, audit the log-prob match", ["kl/mean"])
    return None


def empty_groups(rows: list[dict], cfg: dict) -> Finding | None:
    sig = [x for _, x in series(rows, "groups/signal_frac")] or \
        [1 - x for _, x in series(rows, "groups/degenerate_frac")]
    if not sig or _mean(sig) >= 0.3:
        return None
    r = _mean([x for _, x in series(rows, "reward/mean")])
    why = "saturated: the task is too easy" if r > 0.5 else "empty: the task is too hard for this policy"
    return Finding("saturated or empty groups", "warning", f"only {_mean(sig):.1%} of groups have unequal rewards "
                   f"(mean reward {r:.3f}, {why}); the rest give zero advantage and no gradient",
                   "lesson 13 (dynamic sampling), lesson 18a (filter by p̂(1 − p̂))",
                   "filter prompts by pass rate, or dynamic sampling (algorithm.name=dapo)",
                   ["groups/signal_frac", "reward/mean"])


def nan_risk(rows: list[dict], cfg: dict) -> Finding | None:
    bad = sum(x for _, x in series(rows, "step/nonfinite"))
    evidence, severe = [], False
    if bad:
        evidence.append(f"{bad:.0f} optimizer steps skipped for a non-finite loss or gradient (step/nonfinite)")
        severe = True
    first = next((r for r in rows if "ratio/p95" in r), None)
    if first and (first["ratio/p95"] > 2 or first["ratio/p05"] < 0.25):
        evidence.append(f"first trained step's ρ spans {first['ratio/p05']:.3f}..{first['ratio/p95']:.3f} (p05..p95):"
                        " the ratio is far from 1 before training moved much (stale snapshot, log-prob mismatch)")
        severe = True
    g = [x for _, x in series(rows, "grad/norm_max")] or [x for _, x in series(rows, "grad/norm")]
    if len(g) >= 5 and max(g) > 10 * _median(g):
        evidence.append(f"gradient norm peaks at {max(g):.3g}, {max(g) / _median(g):.0f}× its median")
    if not evidence:
        return None
    return Finding("NaN risk", "severe" if severe else "warning", "; ".join(evidence),
                   "lesson 10 (clipping), lesson 19, lesson 23", "lower the lr, keep grad_clip, check precision",
                   ["grad/norm", "ratio/p95", "ratio/p05"])


def dpo_displacement(rows: list[dict], cfg: dict) -> Finding | None:
    c, r = _ends(rows, "logp/chosen"), _ends(rows, "logp/rejected")
    if not c or not r or not (c[1] < c[0] - 0.1 and r[1] < r[0] - 0.1):
        return None
    return Finding("DPO likelihood displacement", "warning", f"log π(chosen) {c[0]:.2f} → {c[1]:.2f} and "
                   f"log π(rejected) {r[0]:.2f} → {r[1]:.2f}: the margin grows by pushing both down",
                   "lesson 16", "lower β or the lr; add an SFT term on the chosen (RPO) or try IPO",
                   ["logp/chosen", "logp/rejected"])


def role_times(rows: list[dict]) -> RoleTimes:
    """Median seconds per role over the steps that ran it (a skipped step samples and scores but does not train),
    the run's first such step left out when there are more: it pays the one-time start-up (engine, kernels)."""
    def med(key: str) -> float:
        v = [x for _, x in series(rows, key)]
        return _median(v[1:] if len(v) > 1 else v) if v else 0.0
    return RoleTimes(**{k: med(f"time/{k}") for k in ROLE_KEYS})


def time_shares(rows: list[dict], cfg: dict) -> Finding | None:
    t = role_times(rows)
    total = t.step("colocated")
    if total <= 0:
        return None
    shares = t.shares()
    parts = ", ".join(f"{k} {shares[k]:.0%}" for k in ROLE_KEYS)
    off = [f"{k} {shares[k]:.0%} (typical {lo:.0%}–{hi:.0%})" for k, (lo, hi) in TYPICAL_RANGES.items()
           if not lo <= shares[k] <= hi]
    bound = "rollout-bound" if t.rollout + t.verify >= t.ref + t.train else "train-bound"
    best = [f"{n} (−{s:.3g} s)" for n, s in gain_of_each(t)[:3] if s > 0]
    return Finding("time shares", "info", f"median step {total:.3g} s: {parts}; {bound}"
                   + (f"; outside lesson 28's typical split: {'; '.join(off)}" if off else "")
                   + (f"; the allocator's best single optimisations on this split: {', '.join(best)}" if best else ""),
                   "lesson 22a (the throughput equation), lesson 28 (the allocator and playbook)",
                   "profile the largest role first; apply one optimisation at a time and re-measure",
                   [f"time/{k}" for k in ROLE_KEYS])


CHECKS = (reward_hacking, stale_sync, length_drift, entropy_collapse, kl_spike, empty_groups, nan_risk,
          dpo_displacement, time_shares)


def diagnose(rows: list[dict], cfg: dict | None = None) -> list[Finding]:
    """Every check's finding, severe first."""
    cfg = cfg or {}
    found = [f for check in CHECKS if (f := check(rows, cfg)) is not None]
    return sorted(found, key=lambda f: SEVERITIES.index(f.severity))


def render(findings: list[Finding]) -> str:
    """The findings as markdown (also read on a terminal)."""
    if not findings:
        return "No findings."
    out = []
    for f in findings:
        out += [f"- **{f.severity.upper()}: {f.name}.** {f.evidence}.", f"  Read: {f.lesson}." +
                (f" Try: {f.fix}." if f.fix else "")]
    return "\n".join(out)


def write_into_report(run_dir: str | Path, rows: list[dict], findings: list[Finding]) -> Path:
    """Append (or replace) a `## Diagnosis` section in the run's report.md, with one plot per finding."""
    from rlpt.report import figure
    run_dir = Path(run_dir)
    parts = ["## Diagnosis (`rlpt diagnose`)", "", render(findings), ""]
    for i, f in enumerate(findings):
        if f.name == "time shares":
            t = role_times(rows)
            png = run_dir / "diagnose_time_shares.png"
            with figure(png, size=(6, 2.8)) as ax:
                sh = t.shares()
                ax.barh(list(ROLE_KEYS), [sh[k] for k in ROLE_KEYS], label="this run")
                ax.barh(list(ROLE_KEYS), [sum(TYPICAL_RANGES[k]) / 2 for k in ROLE_KEYS], fill=False,
                        edgecolor="k", label="typical (lesson 22a)")
                ax.set_xlabel("share of the step")
                ax.legend(fontsize=7)
        else:
            pts = {k: series(rows, k) for k in f.keys}
            pts = {k: v for k, v in pts.items() if v}
            if not pts:
                continue
            png = run_dir / f"diagnose_{i}.png"
            with figure(png, size=(6, 3)) as ax:
                for k, v in pts.items():
                    ax.plot([s for s, _ in v], [x for _, x in v], marker="." if len(v) < 40 else None, label=k)
                ax.set_xlabel("step")
                ax.set_title(f.name)
                ax.legend(fontsize=7)
        parts += [f"![{f.name}]({png.name})", ""]
    report = run_dir / "report.md"
    old = report.read_text() if report.is_file() else f"# {run_dir.name}\n"
    old = old.split("## Diagnosis (`rlpt diagnose`)")[0].rstrip() + "\n\n"
    report.write_text(old + "\n".join(parts))
    return report
