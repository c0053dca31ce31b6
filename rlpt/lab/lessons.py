"""The course's 33 lesson pages (shared/seed/lessons_index.txt) and where each one's widget lives.

`widget` names a module in rlpt/lab/widgets/ (imported only when its page is opened: some need torch);
`code` lists the rlpt files the lesson is about; `missing` says, for a lesson with no widget, what is not built
yet — the lab never shows a made-up widget.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Lesson:
    slug: str          # "10", "18a", "22b": the URL /lesson/<slug>
    title: str
    code: str          # the rlpt files that implement it (docs/lessons.md)
    widget: str = ""   # module under rlpt.lab.widgets, "" = none yet
    missing: str = ""  # what is missing when there is no widget


LESSONS = [
    Lesson("00", "Orientation: the six roles", "rlpt/framework/ (one file per role), rlpt/framework/controller.py",
           missing="the course has no widget here (a static figure); the lab's index links every role's lesson"),
    Lesson("01", "What is post-training RL?", "rlpt/algorithms/reinforce.py, rlpt/framework/controller.py",
           widget="l01_bandit"),
    Lesson("02", "Rollout: sampling and π_old", "rlpt/engine/sampling.py, rlpt/framework/rollout.py",
           widget="l02_sampling"),
    Lesson("03", "Reward & reference: the KL anchor", "rlpt/gpt_mini/task.py (verify), rlpt/envs/leaky.py, "
           "rlpt/framework/algorithm.py (kl_estimate)", widget="l03_reward_kl"),
    Lesson("04", "Algorithm: the plugin interface", "rlpt/framework/algorithm.py, rlpt/algorithms/",
           widget="l04_advantages"),
    Lesson("05", "Trainer: where gradients flow", "rlpt/framework/trainer.py, rlpt/framework/trajectory.py",
           widget="l05_loss"),
    Lesson("06", "Weight sync: closing the loop", "rlpt/framework/weight_sync.py",
           widget="l06_stale_sync"),
    Lesson("07", "Controller: the orchestrator", "rlpt/framework/controller.py",
           widget="l07_controller"),
    Lesson("08", "Agentic RL: multi-turn and tool masking", "rlpt/framework/agent_loop.py, rlpt/envs/calculator.py",
           widget="l08_tool_mask"),
    Lesson("09", "REINFORCE", "rlpt/algorithms/reinforce.py",
           widget="l09_estimator_noise"),
    Lesson("10", "PPO: the clip table", "rlpt/framework/algorithm.py (clipped_surrogate), rlpt/algorithms/ppo.py",
           widget="l10_ppo_clip"),
    Lesson("11", "GRPO: drop the critic", "rlpt/algorithms/grpo.py", widget="l11_grpo"),
    Lesson("12", "RLOO: leave-one-out", "rlpt/algorithms/rloo.py", widget="l12_rloo"),
    Lesson("13", "DAPO: four practical fixes", "rlpt/algorithms/dapo.py", widget="l13_dapo"),
    Lesson("14", "Dr.GRPO: debiasing", "rlpt/algorithms/drgrpo.py, rlpt/framework/algorithm.py (aggregate)",
           widget="l14_drgrpo"),
    Lesson("15", "RLHF: the original recipe", "rlpt/preference/reward_model.py",
           widget="l15_bradley_terry"),
    Lesson("16", "DPO: RL without RL", "rlpt/preference/dpo.py", widget="l16_dpo"),
    Lesson("17", "PRM, ORM & search", "rlpt/search/", widget="l17_search"),
    Lesson("18", "Environments & verifiers", "rlpt/framework/environment.py, rlpt/envs/",
           widget="l18_reward_hacking"),
    Lesson("18a", "Data pipelines & curation", "rlpt/data/signal.py", widget="l18a_signal"),
    Lesson("19", "System topology", "rlpt/perf/throughput.py (RoleTimes); Ray executors: rlpt/systems/ (open issue)",
           widget="l19_topology"),
    Lesson("20", "KV cache & PagedAttention", "rlpt/perf/memory.py, rlpt/engine/block_manager.py",
           widget="l20_kv"),
    Lesson("21", "Scheduling tricks", "rlpt/engine/scheduler.py, rlpt/engine/spec_decode.py",
           widget="l21_scheduling"),
    Lesson("22", "Memory & throughput math", "rlpt/perf/memory.py, rlpt/perf/flops.py", widget="l22_memory"),
    Lesson("22a", "The throughput equation", "rlpt/perf/throughput.py", widget="l22a_roles"),
    Lesson("22b", "Long-tail rollouts", "rlpt/perf/throughput.py (max_of_k, straggler_tax)",
           widget="l22b_straggler"),
    Lesson("22c", "Async pipelining & weight sync", "rlpt/perf/throughput.py (async_clip_fraction)",
           widget="l22c_async"),
    Lesson("23", "Famous recipes & failure modes", "recipes/, rlpt/perf/diagnose.py",
           missing="no widget: the lab's runs dashboard shows `rlpt diagnose`'s findings for your own runs (/runs)"),
    Lesson("24", "RL infra engineer: the role", "check/logp_mismatch in rlpt/framework/trainer.py",
           missing="the course has no calculator here; not built in the lab"),
    Lesson("25", "Kernels for RL", "rlpt/perf/memory.py (logits_bytes, prefix_sharing_ratio)",
           widget="l25_kernels"),
    Lesson("26", "Why RL is shaping this way", "(synthesis)",
           missing="the three-forces simulator is a toy with no rlpt code behind it; not built"),
    Lesson("27", "Missing concepts", "rlpt/framework/algorithm.py (kl_estimate k1/k2/k3)", widget="l27_kl"),
    Lesson("28", "Bottlenecks & optimizations", "rlpt/perf/throughput.py (allocate)", widget="l28_allocator"),
]
BY_SLUG = {lesson.slug: lesson for lesson in LESSONS}
assert len(LESSONS) == 33
