"""Partial rollouts (lesson 22b): a rollout worker carries unfinished sequences across a weight update.

    system.topology=async system.partial_rollouts=true [system.segment_tokens=S]

Without them a chunk of groups is one `generate` call, and a sync queued on the worker waits until the chunk's
longest sequence is done: the long tail holds the new weights back (and, admission being oldest-first, the
trainer too). With them the async driver runs a chunk as a series of segments, each at most S new tokens per
sequence (S = rollout.max_tokens // 4 by default); a sync queued meanwhile lands between two segments, so the
rest of a sequence is sampled by the new weights (PipelineRL's in-flight updates). A segment continues a
sequence by prefilling its prompt + the tokens so far under the current weights (NeMo-RL's
`recompute_kv_cache_after_weight_updates`: no K/V computed by the old weights is reused), then samples on.

Every token keeps the version it was sampled under: `Trajectory.extra["version"]` (R,), and `old_logp[t]` is
log μ_t of the weights that sampled token t, given the prefix. The off-policy corrections (rlpt.framework.offpolicy)
then need nothing else: ρ_t = π_prox(y_t)/μ_t is per token, so a token sampled by the trainer's current weights
has ρ_t = 1 and an older one its own ratio, whatever the rest of its sequence. `Trajectory.version` is the
oldest token's (the one the staleness gate bounds: the chunk was admitted at that version or later), so the
trainer's log-prob check only reads rows sampled entirely by its current weights. `token_staleness` counts
staleness per token (`system/token_staleness_mean|max`, `system/mixed_version_frac`).

Single-turn rollouts only (an agent loop's tool turns would need their own continuation).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from rlpt.framework.rollout import Rollout
from rlpt.framework.trajectory import Trajectory
from rlpt.gpt_mini.generate import Sample


@dataclass
class Seq:
    """One sample in progress: its tokens, their log-probs under the weights that drew them, those versions."""
    tokens: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str = ""                  # "" while unfinished


class PartialRollout:
    """A rollout worker's chunk in progress: `start` draws its prompts, each `advance` samples one segment."""

    def __init__(self, rollout: Rollout, env, k: int, segment_tokens: int, max_seq_len: int):
        if type(rollout) is not Rollout:
            raise ValueError(f"system.partial_rollouts continues single-turn rollouts only, not "
                             f"{type(rollout).__name__} (a multi-turn agent loop): set partial_rollouts=false")
        self.rollout, self.env, self.k, self.max_seq_len = rollout, env, k, max_seq_len
        self.max_tokens = rollout.sampling.max_tokens
        self.segment = segment_tokens or max(1, self.max_tokens // 4)
        self.prompts: list = []              # this chunk's prompts
        self.seqs: list[list[Seq]] = []      # [group][sample]
        self.stats: dict = {}

    @property
    def active(self) -> bool:
        return bool(self.seqs)

    def start(self, n_groups: int) -> None:
        if self.seqs:
            raise RuntimeError("a rollout worker got a new chunk before finishing the one in progress")
        if self.rollout._engine is not None:   # what Rollout.generate does: a step depends on weights + RNG only
            self.rollout._engine.reset_prefix_caches()
        self.prompts = [self.env.reset("train") for _ in range(n_groups)]
        self.seqs = [[Seq() for _ in range(self.k)] for _ in range(n_groups)]
        self.stats = {"time/generate": 0.0, "time/verify": 0.0, "partial/segments": 0.0}

    def advance(self) -> list[list[Trajectory]] | None:
        """One segment for every unfinished sequence, sampled with the weights held now; -> the chunk's groups,
        verified, once every sequence has finished, else None (the worker keeps them for the next call)."""
        todo = [(g, s) for g, group in enumerate(self.seqs) for s in group if not s.finish_reason]
        t0 = time.perf_counter()
        if todo:
            want = [min(self.segment, self.max_tokens - len(s.tokens)) for _, s in todo]
            # one call per segment length (sequences near max_tokens ask for fewer)
            for m in sorted(set(want)):
                part = [(g, s) for (g, s), w in zip(todo, want) if w == m]
                sp = replace(self.rollout.sampling, max_tokens=m)
                out = self.rollout._sample([list(self.prompts[g].ids) + s.tokens for g, s in part], sp,
                                           self.rollout.generator)
                for (g, s), sample in zip(part, out):
                    self._extend(g, s, sample, m)
            self.stats["partial/segments"] += 1.0
        self.stats["time/generate"] += time.perf_counter() - t0
        if any(not s.finish_reason for group in self.seqs for s in group):
            return None
        t1 = time.perf_counter()
        groups = [[self._trajectory(g, s) for s in group] for g, group in enumerate(self.seqs)]
        self.stats["time/verify"] += time.perf_counter() - t1
        self.seqs, self.prompts = [], []
        return groups

    def _extend(self, g: int, s: Seq, sample: Sample, asked: int) -> None:
        v = self.rollout.version
        s.tokens += list(sample.tokens)
        s.logps += list(sample.logps)
        s.versions += [v] * len(sample.tokens)
        room = self.max_seq_len - len(self.prompts[g].ids) - len(s.tokens)
        if sample.finish_reason == "stop":
            s.finish_reason = "stop"
        elif len(s.tokens) >= self.max_tokens or len(sample.tokens) < asked or room <= 0:
            s.finish_reason = "length"             # max_tokens, or the context is full

    def _trajectory(self, g: int, s: Seq) -> Trajectory:
        t = self.rollout._trajectory(self.prompts[g], Sample(s.tokens, s.logps, s.finish_reason), self.env, g)
        t.extra["version"] = torch.tensor(s.versions, dtype=torch.float32)     # (R,)
        t.version = min(s.versions, default=self.rollout.version)
        return t


def token_staleness(groups: list[list[Trajectory]], trainer_version: int) -> dict:
    """Staleness per sampled token, in syncs: trainer version − the version each token was sampled under
    (extra["version"], or the trajectory's for whole-sequence rollouts); and the share of trajectories whose
    tokens span more than one version."""
    stale, mixed, n = [], 0, 0
    for g in groups:
        for t in g:
            v = t.extra.get("version")
            v = v[t.response_mask > 0] if v is not None else torch.full((int(t.response_mask.sum()),),
                                                                         float(t.version))
            stale.append(trainer_version - v)
            mixed += int(v.numel() > 0 and bool((v != v[0]).any()))
            n += 1
    s = torch.cat(stale) if stale else torch.zeros(0)
    return {"system/token_staleness_mean": s.mean().item() if s.numel() else 0.0,
            "system/token_staleness_max": s.max().item() if s.numel() else 0.0,
            "system/mixed_version_frac": mixed / max(n, 1)}
