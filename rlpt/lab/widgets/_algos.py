"""Shared by the algorithm widgets: build rlpt's registered algorithms and run their real advantage code on a
group of rewards (torch is imported here, on first use of such a widget)."""
from __future__ import annotations

from types import SimpleNamespace


def advantages(name: str, rewards: list[float], **cfg) -> tuple[list[float], bool]:
    """rlpt's `compute_advantages` of algorithm `name` on one group -> (advantages, degenerate)."""
    import rlpt.algorithms  # noqa: F401 - registers the six algorithms
    from rlpt.framework.algorithm import make_algorithm
    algo = make_algorithm({"name": name, **cfg}, len(rewards), 16)
    group = [SimpleNamespace(reward=float(r), advantage=None, degenerate=False) for r in rewards]
    algo.compute_advantages([group])
    return [t.advantage for t in group], any(t.degenerate for t in group)


def population(rewards: list[float]) -> list[float]:
    """The course widgets' GRPO (population std, ÷K, eps 1e-6), shown beside rlpt's value where they differ."""
    k = len(rewards)
    m = sum(rewards) / k
    sd = (sum((r - m) ** 2 for r in rewards) / k) ** 0.5
    return [0.0] * k if sd < 1e-8 else [(r - m) / (sd + 1e-6) for r in rewards]
