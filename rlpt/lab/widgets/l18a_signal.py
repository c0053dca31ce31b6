"""Lesson 18a · "Gradient-signal density simulator": rlpt.data.signal over the course's pool of 1000 prompts.

    difficulty d_i = 3u² − 2u³, u = (i + ½)/N;  p_i = σ(6(s − d_i));  keep if |p − ½| < ½ − 0.45·curation
    signal = Σ p(1−p);  wasted = Σ K(p^K + (1−p)^K) / Σ K  (samples in all-equal groups: zero gradient)
"""
from __future__ import annotations

import math

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "Gradient-signal density simulator"
SOURCE = ["rlpt.data.signal:wasted_fraction", "rlpt.data.signal:signal", "rlpt.data.signal:wasted"]
NOTES = [("course", "Strength 20, curation 0, K=8: 1000 kept, Σp(1−p) = 120.5, 42.0% of compute wasted "
                    "(the all-fail tail); strength 80 is symmetric (42.0%). Strength 80, curation 80: 160 kept, "
                    "1.4% wasted. Breaking: no curation at either extreme of strength."),
         ("course", "The course's 'signal' is Σ p(1−p); rlpt's signal(p, K) = p(1−p)(K−1)/K is the expected "
                    "squared group-centred advantage, the quantity a mean-centred estimator actually gets; "
                    "the lab shows both.")]
N = 1000


class Knobs(BaseModel):
    strength: float = Field(20, ge=0, le=100, description="policy strength")
    curation: float = Field(0, ge=0, le=100, description="curation")
    k: int = Field(8, ge=2, le=32, description="rollouts K")


def compute(k: Knobs) -> dict:
    from rlpt.data.signal import signal, wasted_fraction
    s, half = k.strength / 100, 0.5 - 0.45 * k.curation / 100
    ps = []
    for i in range(N):
        u = (i + 0.5) / N
        ps.append(1 / (1 + math.exp(-6 * (s - (3 * u * u - 2 * u ** 3)))))
    kept = [p for p in ps if abs(p - 0.5) < half]
    hist_kept, hist_all = [0] * 20, [0] * 20
    for p in ps:
        hist_all[min(int(p * 20), 19)] += 1
    for p in kept:
        hist_kept[min(int(p * 20), 19)] += 1
    sig = sum(p * (1 - p) for p in kept)
    return {"kept": len(kept), "signal_course": sig, "signal_rlpt": sum(signal(p, k.k) for p in kept),
            "wasted": wasted_fraction(kept, k.k), "signal_per_flop": 100 * sig / (len(kept) * k.k) if kept else 0.0,
            "hist_kept": hist_kept, "hist_dropped": [a - b for a, b in zip(hist_all, hist_kept)]}


def render(r: dict) -> str:
    k = svg.kpis([("kept", str(r["kept"])), ("Σ p(1−p)", f'{r["signal_course"]:.1f}'),
                  ("rlpt signal Σ p(1−p)(K−1)/K", f'{r["signal_rlpt"]:.1f}'),
                  ("compute wasted", f'{100 * r["wasted"]:.1f}%'), ("signal / FLOP", f'{r["signal_per_flop"]:.2f}')])
    labels = [f"{b / 20:.2f}" if b % 4 == 0 else "" for b in range(20)]
    return k + svg.bar_chart(labels, {"kept": r["hist_kept"], "dropped": r["hist_dropped"]}, "prompts",
                             "pass-rate histogram")
