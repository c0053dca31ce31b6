"""An online curriculum over a prompt set (lesson 18a, stages 5 and 7 online): per-prompt pass rates updated from
every step's groups, and a sampler that favours the prompts that still teach.

    after a group of K rewards r on prompt x:   s_x <- γ s_x + Σ r,   n_x <- γ n_x + K
    p̂_x = (s_x + α q_k) / (n_x + α)                q_k = (Σ_{y in k} s_y + 1) / (Σ_{y in k} n_y + 2), k = x's stratum
    w_x = max(p̂_x (1 - p̂_x), floor)               a batch of m distinct prompts drawn with P ∝ w
                                                     (Efraimidis & Spirakis 2006: the m largest u^(1/w), u ~ U(0,1))

With no strata q = 1/2 for every prompt, and α = 2 is Laplace's (s + 1)/(n + 2): an unseen prompt reads 1/2,
the largest weight. Strata (for arithmetic, the operand count) share what is known about a kind of prompt: α
pseudo-samples at the stratum's pooled pass rate stand in for a prompt's own few. Without them a 256-prompt pool
per count, 32 prompts a step, sees each prompt once in ~30 steps, one group of K = 8 leaves a solved and an
unsolved prompt at the same weight (p̂ = 9/10 and 1/10: 0.09), and every unseen one outweighs both at 0.25: the
draw is close to uniform and nearly every group degenerate (measured: docs/data.md). With them an unseen
2-operand prompt of a solved count reads ≈ 1 and an unseen 5-operand one its count's rate.

p̂(1-p̂) is the expected per-sample signal of lesson 18a up to (K-1)/K. The floor keeps easy and hard prompts
reachable: MiMo (issue #12 of its repository) saw instability when solved prompts left training for good, and
p̂ drifts with the policy (a prompt at p̂ = 0 now may be at 0.4 in a thousand steps), so nothing is ever removed.
γ < 1 forgets old groups (the policy that produced them is gone); γ = 1 keeps every count.

For arithmetic, `OperandRamp` widens the operand counts a curriculum draws from, one count at a time:

    width w (start: the widest count the SFT start was shown)
    after each step: window <- the last `window` rewards of samples on w-operand prompts
    widen to w + 1 when the window is full and its mean >= threshold (then the window starts empty)

so RL extends a policy past its demonstrations only as fast as it masters each width. A count just opened brings
unseen prompts (p̂ = 1/2, the largest weight), so the sampler turns to them by itself.

Over a prompt file the counts may start from an offline measurement (`counts`: rlpt data curate writes p̂ and K
into each kept row's metadata), so the first draws already favour the prompts that teach.

The state (counts, the sampler's RNG, the ramp's width and window) round-trips through `state_dict`, so a resumed
run draws the same batches. The classes are pure; rlpt.envs.curriculum wires them into training (`env.name=
curriculum`), where the controller hands each step's groups to the env's `observe`.
"""
from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence


class Curriculum:
    def __init__(self, ids: Sequence[str], floor: float = 0.01, decay: float = 1.0, seed: int = 0,
                 strata: Sequence[Hashable] | None = None, prior: float = 2.0,
                 counts: Sequence[tuple[float, float]] | None = None):
        if not ids:
            raise ValueError("a curriculum needs at least one prompt")
        if len(set(ids)) != len(ids):
            raise ValueError("curriculum prompt ids must be unique")
        if not 0 < floor <= 0.25:
            raise ValueError(f"floor must be in (0, 0.25] (p(1-p) is at most 0.25), got {floor}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if prior <= 0:
            raise ValueError(f"prior (pseudo-samples at the stratum's rate) must be > 0, got {prior}")
        if strata is not None and len(strata) != len(ids):
            raise ValueError(f"one stratum per prompt: {len(strata)} strata for {len(ids)} prompts")
        if counts is not None and (len(counts) != len(ids) or any(not 0 <= s <= n for s, n in counts)):
            raise ValueError(f"one (successes, samples) pair per prompt with 0 <= successes <= samples: {len(counts)} "
                             f"pairs for {len(ids)} prompts")
        self.ids, self.floor, self.decay, self.prior = list(ids), floor, decay, prior
        self.index = {x: i for i, x in enumerate(self.ids)}
        self.strata = list(strata) if strata is not None else None     # None: q = 1/2 for every prompt
        # discounted reward sums and sample counts; `counts` starts them from an offline measurement
        # (rlpt data curate's p̂ of K samples: s = p̂ K, n = K), else from nothing
        self.s = [float(s) for s, _ in counts] if counts is not None else [0.0] * len(self.ids)
        self.n = [float(n) for _, n in counts] if counts is not None else [0.0] * len(self.ids)
        self.rng = random.Random(seed)
        self._pool()

    def _pool(self) -> None:
        """q_k of every stratum, summed in id order (recomputed, never accumulated: a resume gets the same floats)."""
        s, n = {}, {}
        for i, k in enumerate(self.strata or []):
            s[k], n[k] = s.get(k, 0.0) + self.s[i], n.get(k, 0.0) + self.n[i]
        self.q = {k: (s[k] + 1) / (n[k] + 2) for k in s}

    def p_hat(self, x: str) -> float:
        i = self.index[x]
        q = self.q[self.strata[i]] if self.strata is not None else 0.5
        return (self.s[i] + self.prior * q) / (self.n[i] + self.prior)

    def weight(self, x: str) -> float:
        p = self.p_hat(x)
        return max(p * (1 - p), self.floor)

    def update(self, groups: Sequence[tuple[str, Sequence[float]]]) -> None:
        """Fold in one step's groups: (prompt id, the group's rewards in [0, 1])."""
        for x, rewards in groups:
            i = self.index[x]
            self.s[i] = self.decay * self.s[i] + float(sum(rewards))
            self.n[i] = self.decay * self.n[i] + len(rewards)
        self._pool()

    def sample(self, m: int, among: Sequence[str] | None = None) -> list[str]:
        """m distinct prompt ids of `among` (default: all; all of them if m >= their number), P(first = x) = w_x / Σ w.
        m = len(among) is a weighted random order of them: take from its front."""
        ids = self.ids if among is None else among
        keys = [(math.log(1 - self.rng.random()) / self.weight(x), x) for x in ids]   # log u^(1/w), u in (0, 1]
        keys.sort(key=lambda t: t[0], reverse=True)
        return [x for _, x in keys[:m]]

    def state_dict(self) -> dict:
        return {"ids": list(self.ids), "s": list(self.s), "n": list(self.n), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        if state["ids"] != self.ids:
            raise ValueError("the curriculum's saved prompt ids differ from this prompt set: resume with the same set")
        self.s, self.n = list(state["s"]), list(state["n"])
        self.rng.setstate(state["rng"])
        self._pool()


class OperandRamp:
    """The widest operand count drawn, widened as the pass rate at that count reaches `threshold` (module doc)."""

    def __init__(self, start: int, stop: int, threshold: float = 0.8, window: int = 64):
        if not 1 <= start <= stop:
            raise ValueError(f"an operand ramp needs 1 <= start <= stop, got start={start}, stop={stop}")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.width, self.stop, self.threshold, self.window = start, stop, threshold, window
        self.recent: list[float] = []      # the last `window` rewards at the current width

    def pass_rate(self) -> float | None:
        """The mean of the window (None while it is empty)."""
        return sum(self.recent) / len(self.recent) if self.recent else None

    def update(self, outcomes: Sequence[tuple[int, Sequence[float]]]) -> bool:
        """Fold in one step's groups as (operand count, rewards); True if the ramp widened."""
        for count, rewards in outcomes:
            if count == self.width:
                self.recent = (self.recent + [float(r) for r in rewards])[-self.window:]
        if self.width < self.stop and len(self.recent) == self.window and self.pass_rate() >= self.threshold:
            self.width, self.recent = self.width + 1, []
            return True
        return False

    def state_dict(self) -> dict:
        return {"width": self.width, "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.width, self.recent = state["width"], list(state["recent"])
