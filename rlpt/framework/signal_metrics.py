"""What a step's groups were worth as training data (lesson 18a): the metrics every RL run logs beside the rewards.

For a group of K rewards in [0, 1] with empirical pass rate p̂ = (1/K) Σ r_i:

    signal(p, K)  = p(1-p)(K-1)/K       E[(1/K) Σ (r_i - r̄)²] for r_i ~ Bernoulli(p): E[A²] per sample, A = r - r̄
    wasted(p, K)  = K (p^K + (1-p)^K)   expected samples of a K-group spent on a degenerate group (all rewards equal)

Per step, averaged over the step's groups (units: samples per prompt, out of K):

    data/wasted_realised   K · 1[group degenerate]        what this step spent on groups that carry no gradient
    data/wasted_expected   K (p̂^K + (1-p̂)^K)              the plug-in: what the same prompts would waste on a redraw,
                                                            were their pass rates the measured p̂
    data/signal            (1/K) Σ (r_i - r̄)²             the realised E[A²] (for 0/1 rewards: p̂(1-p̂))
    data/passrate_hist/*   the fraction of groups with p̂ in each fixed bucket: 0, (0, .25), [.25, .5), [.5, .75),
                           [.75, 1), 1 (the end buckets are the degenerate groups, which did not train)

Which waste number to read: 1[all K pass] is the *only* unbiased estimator of p^K from K draws (its expectation is
P(all pass) = p^K), so the realised count is the unbiased estimate of the expected waste at the prompts' true pass
rates. The plug-in is biased upwards: a degenerate group contributes K to both, and a mixed group contributes 0 to the
realised count but K(p̂^K + (1-p̂)^K) > 0 to the plug-in, so wasted_expected ≥ wasted_realised at every step. Read
the realised number for what the step cost, the plug-in for how close the mixed prompts sit to the edges (it
rises before the degenerate count does as a policy saturates a prompt set).

Rewards outside [0, 1] (a reward model's scores) are not pass/fail: then only the bucket-free
`data/wasted_realised` is reported. `groups/degenerate_frac` (rollout_metrics) is the fraction of groups the
algorithm dropped, which for equal-reward groups is wasted_realised / K.
"""
from __future__ import annotations

from collections.abc import Sequence

from rlpt.framework.trajectory import Trajectory

# (name, low, high): p̂ in [low, high); the two end buckets hold exactly 0 and exactly 1
BUCKETS = (("0", 0.0, 0.0), ("0-25", 0.0, 0.25), ("25-50", 0.25, 0.5), ("50-75", 0.5, 0.75), ("75-100", 0.75, 1.0),
           ("100", 1.0, 1.0))


def signal(p: float, k: int) -> float:
    """E[(1/K) Σ (r_i - r̄)²] for K Bernoulli(p) rewards: p(1-p)(K-1)/K."""
    return p * (1 - p) * (k - 1) / k


def wasted(p: float, k: int) -> float:
    """Expected samples of a K-group spent on a degenerate group (all rewards equal): K(p^K + (1-p)^K)."""
    return k * (p ** k + (1 - p) ** k)


def bucket(p: float) -> str:
    """The histogram bucket of a pass rate p in [0, 1]."""
    if p <= 0.0:
        return "0"
    if p >= 1.0:
        return "100"
    return next(name for name, lo, hi in BUCKETS[1:-1] if lo <= p < hi)


def group_stats(rewards: Sequence[float]) -> tuple[float, float, bool]:
    """(p̂ = mean reward, realised E[A²] = (1/K) Σ (r - r̄)², degenerate = all rewards equal) of one group."""
    k = len(rewards)
    p = sum(rewards) / k
    return p, sum((r - p) ** 2 for r in rewards) / k, len(set(rewards)) <= 1


def signal_metrics(groups: Sequence[Sequence[Trajectory]]) -> dict:
    """The step's data metrics (module doc), from the groups as sampled (before any degenerate filter)."""
    rewards = [[float(t.reward) for t in g] for g in groups if g]
    if not rewards:
        return {}
    realised = sum(len(r) for r in rewards if len(set(r)) <= 1) / len(rewards)
    if not all(0.0 <= x <= 1.0 for r in rewards for x in r):
        return {"data/wasted_realised": realised}
    stats = [group_stats(r) for r in rewards]
    out = {"data/wasted_realised": realised,
           "data/wasted_expected": sum(wasted(p, len(r)) for (p, _, _), r in zip(stats, rewards)) / len(rewards),
           "data/signal": sum(a2 for _, a2, _ in stats) / len(stats)}
    counts = {name: 0 for name, _, _ in BUCKETS}
    for p, _, _ in stats:
        counts[bucket(p)] += 1
    out |= {f"data/passrate_hist/{name}": c / len(stats) for name, c in counts.items()}
    return out
