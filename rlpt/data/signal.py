"""How much a prompt teaches, from its pass rate (lesson 18a, §12.1): the quantities every curation choice reads.

    signal(p, K)  = p(1-p)(K-1)/K   = E[ (1/K) Σ_i (r_i - r̄)² ],  r_i ~ Bernoulli(p) i.i.d., r̄ their mean
    wasted(p, K)  = K (p^K + (1-p)^K)   expected samples in groups whose rewards are all equal (zero gradient)
    degenerate    = the fraction of groups whose rewards are all equal

With a group-mean baseline the advantage is A_i = r_i - r̄, so signal is E[A²] per sample: it is the expected
*biased* sample variance of the group's rewards, which is (K-1)/K times p(1-p), the Bernoulli variance and the
expected *unbiased* sample variance (1/(K-1)) Σ (r_i - r̄)². It is exact for the mean-centred estimators
without a /std (RLOO, Dr. GRPO, REINFORCE with a group baseline); for GRPO it governs whether the group
survives (std > 0), not the gradient's size. Wasted samples are the course widget's "compute wasted" numerator:
Σ K(p^K + (1-p)^K) / Σ K over a prompt set.

`signal` and `wasted` live in rlpt/framework/signal_metrics.py (floor 3), where every RL step logs them; they
are re-exported here for the curation stages.
"""
from __future__ import annotations

from collections.abc import Sequence

from rlpt.framework.signal_metrics import signal, wasted  # noqa: F401 - the formulas live with the metrics


def wasted_fraction(ps: Sequence[float], k: int) -> float:
    """The widget's "compute wasted": Σ K(p^K + (1-p)^K) / Σ K over prompts with pass rates `ps`."""
    return sum(wasted(p, k) for p in ps) / (k * len(ps)) if ps else 0.0


def degenerate_fraction(groups: Sequence[Sequence[float]]) -> float:
    """The fraction of groups whose rewards are all equal (all pass or all fail: zero advantage everywhere)."""
    return sum(1 for g in groups if len(set(g)) <= 1) / len(groups) if groups else 0.0
