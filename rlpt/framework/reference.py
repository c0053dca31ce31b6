"""Reference: the frozen SFT policy π_ref that the KL anchor pulls toward.

    ref_logp_t = log π_ref(y_t | x, y_<t)        (forward only, no grad, eval mode)

A deep copy made once, before any RL step: no parameter requires grad, it is in no optimizer, it
never aliases the trainer's or the rollout's weights, so weight decay, a sync or an optimizer bug
cannot make the anchor drift (spec part 1 §5.6). π_old and π_ref coincide at step 0 and part from
step 1 on.
"""
from __future__ import annotations

import copy

import torch

from rlpt.framework.trajectory import Trajectory, collate, per_token_logp


class ReferenceEngine:
    def __init__(self, model: torch.nn.Module, temperature: float = 1.0, micro_batch_size: int = 256):
        self.model = copy.deepcopy(model)
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size
        self.freeze()

    def freeze(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def score(self, trajs: list[Trajectory], pad_id: int) -> None:
        """Fill `ref_logp` (R,) on each trajectory, 0 where response_mask is 0."""
        for i in range(0, len(trajs), self.micro_batch_size):
            part = trajs[i:i + self.micro_batch_size]
            batch = collate(part, pad_id)
            logp = per_token_logp(self.model, batch.input_ids, self.temperature)   # (b, T-1)
            for row, t in enumerate(part):
                P, R = len(t.prompt_ids), len(t.response_ids)
                t.ref_logp = logp[row, P - 1:P - 1 + R] * t.response_mask
