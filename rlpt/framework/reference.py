"""Reference: the frozen SFT policy π_ref that the KL anchor pulls toward.

    ref_logp_t = log π_ref(y_t | x, y_<t)        (forward only, no grad, eval mode)

A deep copy made once, before any RL step: no parameter requires grad, it is in no optimizer, it
never aliases the trainer's or the rollout's weights, so weight decay, a sync or an optimizer bug
cannot make the anchor drift (lesson 03). π_old and π_ref coincide at step 0 and part from
step 1 on.

It is also where anything else that scores a fresh batch forward-only runs, on the same collated
ids: named `scorers`, each `fn(input_ids) -> (B, T-1)`, write `traj.extra[name]` (R,). PPO attaches
its critic as `scorers={"values": critic}`, so V_old is recorded before any update on the batch
(verl computes ref log-probs and values in the same phase). Scorers are live models owned by the
trainer, not frozen copies: they are only read here, under no_grad. An off-policy correction
(rlpt.framework.offpolicy) attaches the trainer's own log-probs the same way, `scorers={"prox_logp":
Reference.prox_scorer(trainer.model, T)}`: scored before the update, they are π_prox.

"Do less": with `ref_logp=False` (the algorithm's `uses_reference` is False: β = 0, no term reads π_ref)
the π_ref forward is skipped, `ref_logp` stays None (zeros after collate) and only the scorers run.

"Do it tighter": with `packing=True` (and a model that takes segment ids) the π_ref forward runs on packed rows
(rlpt.framework.trajectory.pack_rows), with `precision="bf16"` under CPU autocast, as the trainer's does
(trainer.packing, trainer.precision): π_ref and π_θ are then computed the same way, so KL(π_θ‖π_ref) is 0 at
step 0 in either precision. The prox scorer runs at the trainer's precision for the same reason.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from rlpt.framework.trainer import autocast
from rlpt.framework.trajectory import Trajectory, collate, pack_batch, per_token_logp, response_slice, supports_packing


class Reference:
    def __init__(self, model: torch.nn.Module, temperature: float = 1.0, micro_batch_size: int = 256,
                 scorers: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None, ref_logp: bool = True,
                 packing: bool = False, precision: str = "fp32"):
        self.model = copy.deepcopy(model)
        self.packing = packing and supports_packing(self.model)
        autocast(precision)                # an unknown precision fails here
        self.precision = precision
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size
        self.scorers = dict(scorers or {})
        self.ref_logp = ref_logp          # False: no π_ref forward (nothing reads it)
        self.freeze()

    @staticmethod
    def prox_scorer(model: torch.nn.Module, temperature: float,
                    precision: str = "fp32") -> Callable[[torch.Tensor], torch.Tensor]:
        """The live trainer's log-probs as a scorer (eval mode for the forward, then its mode restored): run
        before the update, they are π_prox of the off-policy corrections."""
        def score(input_ids: torch.Tensor) -> torch.Tensor:
            was = model.training
            model.eval()
            try:
                with autocast(precision):
                    return per_token_logp(model, input_ids, temperature)
            finally:
                model.train(was)
        return score

    def freeze(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def score(self, trajs: list[Trajectory], pad_id: int) -> None:
        """Fill `ref_logp` (R,) (unless ref_logp=False), and `extra[name]` (R,) for each scorer, 0 where
        response_mask is 0."""
        if not self.ref_logp and not self.scorers:
            return
        for i in range(0, len(trajs), self.micro_batch_size):
            part = trajs[i:i + self.micro_batch_size]
            batch = collate(part, pad_id)
            logp = None
            if self.ref_logp:
                packed = pack_batch(self.model, batch.input_ids, batch.mask, batch.prompt_len) if self.packing else None
                with autocast(self.precision):
                    logp = per_token_logp(self.model, batch.input_ids, self.temperature, packed=packed)
            scored = {name: fn(batch.input_ids) for name, fn in self.scorers.items()}   # each (b, T-1)
            for row, t in enumerate(part):
                cols = response_slice(len(t.prompt_ids), len(t.response_ids))
                if logp is not None:
                    t.ref_logp = logp[row, cols] * t.response_mask
                for name, x in scored.items():
                    t.extra[name] = x[row, cols].float() * t.response_mask
