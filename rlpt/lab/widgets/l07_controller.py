"""Lesson 07 · "One controller iteration, phase by phase", on rlpt's real Controller: a freshly initialised
gpt_mini (2 layers, d 32) as the policy, the roles built as rlpt.train builds them, and `Controller.step()` run
once (or a few times). The table is the step's trajectories after it: what each role wrote into them — the
rollout's response and old_logp, the environment's reward, the reference's ref_logp, the algorithm's advantage —
and the metrics are the step's own (per-role seconds, the loss, whether the step was skipped).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from rlpt.lab import svg
from rlpt.lab.widgets import no_progress

KIND = "simulation"      # a loop of training steps, not a formula: not held to the calculators' 300 ms
TITLE = "One controller iteration, phase by phase"
SOURCE = ["rlpt.framework.controller:Controller.step"]
IMPORTS = ["rlpt.envs", "rlpt.algorithms", "rlpt.framework.rollout", "rlpt.framework.trainer"]
NOTES = [("course", "The seven steps: 1 rollout.generate(env, K) (sample + verify), 2 reference.score, 3 "
                    "algorithm.compute_advantages, 4 collate, 5 trainer.train_step(batch, algorithm.compute_loss), "
                    "6 weight sync, 7 metrics. The controller never touches tensors itself."),
         ("course", "Breaking: when every group is degenerate (all rewards equal) the controller skips the trainer "
                    "(step/skipped = 1, no loss): an untrained policy on the honest verifier often scores 0 (seeds "
                    "4, 6, 10 and 11 here). The leaky verifier pays random text that contains the answer's digits, so "
                    "its groups are mixed and the step trains on noise: why it is a bad verifier (lesson 18). With "
                    "single-digit "
                    "answers even the honest one sometimes pays random text ending in the right digit (seeds 0, 2, 3) "
                    "— the verifier checklist's random-baseline test.")]
PHASES = ("rollout", "verify", "ref", "train", "sync")


class Knobs(BaseModel):
    env: Literal["leaky", "arithmetic"] = Field("leaky", description="verifier")
    k: int = Field(3, ge=2, le=8, description="K")
    prompts: int = Field(4, ge=1, le=4, description="prompts per step")
    steps: int = Field(1, ge=1, le=20, description="steps")
    seed: int = Field(0, ge=0, le=999, description="seed")


class _Recording:
    """The rollout role, recording the groups it returns (the controller keeps no reference to them)."""

    def __init__(self, inner):
        self.inner, self.groups = inner, []

    def generate(self, env, k):
        self.groups = self.inner.generate(env, k)
        return self.groups

    def __getattr__(self, name):
        return getattr(self.inner, name)


def compute(k: Knobs, progress=no_progress) -> dict:
    import copy

    import torch

    import rlpt.algorithms  # noqa: F401 - registers grpo
    import rlpt.envs  # noqa: F401 - registers leaky
    from rlpt.framework.algorithm import make_algorithm
    from rlpt.framework.controller import Controller
    from rlpt.framework.environment import make_env
    from rlpt.framework.reference import Reference
    from rlpt.framework.rollout import Rollout
    from rlpt.framework.trainer import Trainer
    from rlpt.framework.weight_sync import WeightSyncer
    from rlpt.gpt_mini.generate import SamplingParams
    from rlpt.gpt_mini.model import GPT, GPTConfig
    from rlpt.gpt_mini.task import ArithmeticTask
    from rlpt.gpt_mini.tokenizer import CharTokenizer
    tok = CharTokenizer()
    torch.manual_seed(k.seed)
    policy = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64,
                           max_seq_len=48)).eval()
    env = make_env(k.env, task=ArithmeticTask(max_operands=2, max_value=4), seed=k.seed, tokenizer=tok)
    rollout = _Recording(Rollout(copy.deepcopy(policy), tok, k.prompts, SamplingParams(max_tokens=8), seed=k.seed,
                                 backend="simple"))
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    ctl = Controller(rollout, env, Reference(policy), make_algorithm({"name": "grpo"}, k.k, 8),
                     Trainer(policy, opt, None, 1.0), WeightSyncer(1), k.k, tok.pad_id)
    for s in range(k.steps):
        progress(s / k.steps)
        metrics = ctl.step()
    rows = [[g_i, tok.decode(t.prompt_ids), tok.decode(t.response_ids), t.reward,
             round(float(t.old_logp.sum()), 3), round(float(t.ref_logp.sum()), 3), round(float(t.advantage), 3),
             "no (degenerate)" if t.degenerate else "yes"]
            for g_i, g in enumerate(rollout.groups) for t in g]
    keep = {key: float(v) for key, v in metrics.items() if isinstance(v, (int, float)) or torch.is_tensor(v)
            and v.numel() == 1}
    return {"rows": rows, "metrics": keep, "times": {p: keep.get(f"time/{p}", 0.0) for p in PHASES}}


def render(r: dict) -> str:
    m = r["metrics"]
    k = svg.kpis([("step skipped", "YES: every group degenerate" if m.get("step/skipped") else "no"),
                  ("reward mean", f'{m.get("reward/mean", 0):.2f}'), ("groups kept", f'{m.get("groups/kept", 0):.2f}'),
                  ("loss/pg", f'{m["loss/pg"]:.4f}' if "loss/pg" in m else "— (trainer not called)"),
                  ("synced", "yes" if m.get("sync/done") else "no")])
    table = svg.table(["group", "prompt", "response (ROLLOUT)", "reward (ENV)", "Σ old_logp (ROLLOUT)",
                       "Σ ref_logp (REFERENCE)", "advantage (ALGORITHM)", "trained"], r["rows"])
    times = r["times"]
    return k + table + svg.bar_chart(list(times), {"seconds": [1000 * v for v in times.values()]}, "ms",
                                     "milliseconds per role")
