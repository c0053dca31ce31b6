"""rlpt.framework: the six roles of an RL post-training system around the loss, and the loop that runs them.

    ctl = Controller(rollout, env, reference, algorithm, trainer, syncer, k, pad_id)   # rlpt.train.build wires it
    metrics = ctl.step()

One step, seven lines (controller.py, lesson 07):
    1 rollout.generate(env, K)          sample K responses per prompt, record old_logp, attach the verifier's reward
    2 reference.score(trajs)            ref_logp under the frozen SFT policy (and PPO's V_old)
    3 algorithm.compute_advantages      advantages in place; groups with no signal marked degenerate
    4 collate(kept)                     response-local trajectories -> one padded (B, T-1) batch
    5 trainer.train_step(batch, loss)   the only gradients: epochs × mini-batches × micro-batch chunks
    6 syncer.sync(trainer, rollout)     the fresh weights into the rollout's copy
    7 metrics                           reward/*, loss/*, clip/*, time/<role>

Files, one concept each: trajectory (the data contract: Trajectory, Batch, pad_sequences, collate,
per_token_logp), environment (prompts and verdicts; `Environment` base with neutral defaults, and the registry), rollout
(sampling, dynamic-sampling `GroupFilter`), agent_loop (multi-turn rollout with tool turns, masked),
reference (π_ref and forward-only scorers), algorithm (the `Algorithm` base, registry, aggregation, KL,
clipped surrogate), critic (PPO's value model), trainer (forward, backward, optimizer step), weight_sync
(trainer -> rollout), controller (the loop above, and every role's state for checkpoints), roles (the
interfaces of rollout, reference, trainer and syncer), evaluate (held-out accuracy, one sampler for every job).

Floors: this package imports `rlpt.engine` and `rlpt.gpt_mini` below it, never the algorithms, envs or jobs
above it (`rlpt.algorithms`, `rlpt.envs`, `rlpt.train`), which plug in by registering.
"""
