"""Lesson 22b · "Straggler tax": rlpt.perf.throughput.max_of_k and straggler_tax.

    E[max of K log-normal lengths] ≈ μ·exp(s·√(2 ln K) − s²/2),  s = √ln(1 + CV²);  tax = max/mean − 1
"""
from __future__ import annotations

from pydantic import BaseModel, Field

from rlpt.lab import svg

TITLE = "Straggler tax"
SOURCE = ["rlpt.perf.throughput:max_of_k", "rlpt.perf.throughput:straggler_tax"]
NOTES = [("course", "K=16, CV=1: the group waits for its straggler, ≈5.0× the mean length."),
         ("fix", "The course's widget reports a tax of '≈200–300%' at K=16, CV=1 from one seeded sample; the "
                 "expected value from the lesson's own extreme-value formula is max/mean − 1 = 402%."),
         ("fix", "The course says going from K=16 to 32 'adds about 15%'; its own formula gives +26% at CV=1."),
         ("fix", "The course widget draws one seeded sample (its Resample button has no effect because it reseeds); "
                 "the lab shows the expected maximum, which is what the lesson's table is about."),
         ("course", "Breaking: CV=2 at K=64 → the max is 17× the mean.")]


class Knobs(BaseModel):
    k: int = Field(16, ge=2, le=64, description="K")
    mean: int = Field(800, ge=128, le=4096, description="mean length", json_schema_extra={"step": 64})
    cv: float = Field(1.0, ge=0, le=2.0, description="CV", json_schema_extra={"step": 0.05})


def compute(k: Knobs) -> dict:
    from rlpt.perf.throughput import max_of_k, straggler_tax
    return {"max_len": max_of_k(k.mean, k.cv, k.k), "tax": straggler_tax(k.cv, k.k),
            "double_k": max_of_k(1, k.cv, 2 * k.k) / max_of_k(1, k.cv, k.k) - 1,
            "curve": {f"CV {c}": [(kk, max_of_k(1, c, kk)) for kk in range(2, 65, 2)] for c in (0.5, 1.0, 2.0)}
            | {f"CV {k.cv:g} (yours)": [(kk, max_of_k(1, k.cv, kk)) for kk in range(2, 65, 2)]}}


def render(r: dict) -> str:
    k = svg.kpis([("τ_R (expected longest)", f'{r["max_len"]:.0f} tokens'), ("straggler tax", f'{100 * r["tax"]:.0f}%'),
                  ("doubling K adds", f'{100 * r["double_k"]:.0f}%')])
    return k + svg.line_chart(r["curve"], "K", "max / mean", "expected max of K over the mean")
