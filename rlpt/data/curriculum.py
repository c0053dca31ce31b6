"""An online curriculum over a prompt set (lesson 18a, stages 5 and 7 online): per-prompt pass rates updated from
every step's groups, and a sampler that favours the prompts that still teach.

    after a group of K rewards r on prompt x:   s_x <- γ s_x + Σ r,   n_x <- γ n_x + K
    p̂_x = (s_x + 1) / (n_x + 2)                    (Laplace: an unseen prompt reads 1/2, the most informative)
    w_x = max(p̂_x (1 - p̂_x), floor)               a batch of m distinct prompts drawn with P ∝ w
                                                     (Efraimidis & Spirakis 2006: the m largest u^(1/w), u ~ U(0,1))

p̂(1-p̂) is the expected per-sample signal of lesson 18a up to (K-1)/K. The floor keeps easy and hard prompts
reachable: MiMo (issue #12 of its repository) saw instability when solved prompts left training for good, and
p̂ drifts with the policy (a prompt at p̂ = 0 now may be at 0.4 in a thousand steps), so nothing is ever removed.
γ < 1 forgets old groups (the policy that produced them is gone); γ = 1 keeps every count.

The state (counts and the sampler's RNG) round-trips through `state_dict`, so a resumed run draws the same
batches. This class is pure: it is not wired into rlpt.train yet (the controller would call `update` with each
step's groups and the env would draw its prompts from `sample`).
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence


class Curriculum:
    def __init__(self, ids: Sequence[str], floor: float = 0.01, decay: float = 1.0, seed: int = 0):
        if not ids:
            raise ValueError("a curriculum needs at least one prompt")
        if len(set(ids)) != len(ids):
            raise ValueError("curriculum prompt ids must be unique")
        if not 0 < floor <= 0.25:
            raise ValueError(f"floor must be in (0, 0.25] (p(1-p) is at most 0.25), got {floor}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.ids, self.floor, self.decay = list(ids), floor, decay
        self.index = {x: i for i, x in enumerate(self.ids)}
        self.s = [0.0] * len(self.ids)       # discounted reward sums
        self.n = [0.0] * len(self.ids)       # discounted sample counts
        self.rng = random.Random(seed)

    def p_hat(self, x: str) -> float:
        i = self.index[x]
        return (self.s[i] + 1) / (self.n[i] + 2)

    def weight(self, x: str) -> float:
        p = self.p_hat(x)
        return max(p * (1 - p), self.floor)

    def update(self, groups: Sequence[tuple[str, Sequence[float]]]) -> None:
        """Fold in one step's groups: (prompt id, the group's rewards in [0, 1])."""
        for x, rewards in groups:
            i = self.index[x]
            self.s[i] = self.decay * self.s[i] + float(sum(rewards))
            self.n[i] = self.decay * self.n[i] + len(rewards)

    def sample(self, m: int) -> list[str]:
        """m distinct prompt ids (all of them if m >= the set), P(first = x) = w_x / Σ w."""
        keys = [(math.log(1 - self.rng.random()) / self.weight(x), x) for x in self.ids]   # log u^(1/w), u in (0, 1]
        keys.sort(key=lambda t: t[0], reverse=True)
        return [x for _, x in keys[:m]]

    def state_dict(self) -> dict:
        return {"ids": list(self.ids), "s": list(self.s), "n": list(self.n), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        if state["ids"] != self.ids:
            raise ValueError("the curriculum's saved prompt ids differ from this prompt set: resume with the same set")
        self.s, self.n = list(state["s"]), list(state["n"])
        self.rng.setstate(state["rng"])
