"""The `system:` section of a TrainJob: where the roles run (see rlpt.systems).

    rlpt train recipes/grpo_arith.yaml system.topology=async system.rollout_workers=2 system.max_staleness=2

`colocated` (the default) is the in-process Controller and needs no Ray; every other topology places the
rollout workers (engine + env) and one trainer (reference + algorithm + trainer, + critic) as Ray actors
built from the same TrainJob (`pip install 'rlpt[ray]'`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlpt.config import Section

TOPOLOGIES = ("colocated", "disaggregated", "one_step_off", "async")


class SystemConfig(Section):
    topology: Literal["colocated", "disaggregated", "one_step_off", "async"] = Field(
        "colocated", description="colocated: in-process (no Ray); disaggregated: Ray actors, synchronous; "
                                 "one_step_off: generation of step i+1 overlaps training on i; async: free-running "
                                 "rollout, staleness ≤ max_staleness")
    rollout_workers: int = Field(1, ge=1, description="rollout actors (engine + env); rollout.prompts_per_step is "
                                                      "split among them")
    max_staleness: int = Field(1, ge=0, description="η (async only): a trained group was sampled at most η weight "
                                                    "versions before the trainer's (AReaL's max_head_offpolicyness)")
    transport: Literal["object_store", "gloo"] = Field(
        "object_store", description="weight sync: the Ray object store (ray.put/get), or a ray.util.collective "
                                    "gloo broadcast from the trainer")
    verify: bool = Field(True, description="check every sync by a sha256 digest of the weights (a mismatch stops "
                                           "the run)")
    max_restarts: int = Field(0, ge=0, description="rollout workers that may die and be replaced (rlpt.systems."
                                                   "restart; disaggregated: from a state copy per step, exactly; "
                                                   "one_step_off / async: with the trainer's weights); 0 = a dead "
                                                   "worker ends the run")
    trainer_workers: int = Field(1, ge=1, description="data-parallel trainer actors (rlpt.systems.ddp): each "
                                                      "trains its share of every mini-batch, gradients summed "
                                                      "over gloo (NCCL on GPU); rank 0 syncs the rollout workers")
    partial_rollouts: bool = Field(False, description="async only: a rollout worker keeps its unfinished "
                                                      "sequences across a weight update; each token carries the "
                                                      "version it was sampled under (lesson 22b)")
    segment_tokens: int = Field(0, ge=0, description="partial rollouts: new tokens per sequence between two "
                                                     "points where a weight update may land; 0 = "
                                                     "rollout.max_tokens // 4")
    address: str | None = Field(None, description="Ray cluster to attach to (e.g. 'auto', 'ray://head:10001'); "
                                                  "None: RAY_ADDRESS, or a local Ray started for the run")

    @model_validator(mode="after")
    def _placement(self):
        if self.topology == "colocated" and self.trainer_workers > 1:
            raise ValueError(f"system.trainer_workers={self.trainer_workers} places trainer actors on Ray: set "
                             "system.topology=disaggregated (or one_step_off / async), or trainer_workers=1")
        if self.partial_rollouts and self.topology != "async":
            raise ValueError("system.partial_rollouts=true carries sequences across weight updates, which only "
                             f"system.topology=async makes (got {self.topology}): set topology=async or "
                             "partial_rollouts=false")
        return self
