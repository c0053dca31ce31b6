"""rlpt.systems: the same roles placed by an executor (floor 5; lessons 19, 22c).

    system.topology=colocated      today's in-process Controller (rlpt.framework.controller), no Ray
    system.topology=disaggregated  rollout workers and one trainer as Ray actors, synchronous (η = 0)
    system.topology=one_step_off   generation of step i+1 overlaps training on step i (staleness exactly 1)
    system.topology=async          free-running rollout behind AReaL's admission gate (staleness ≤ η)

Files: config (SystemConfig, the `system:` section of a TrainJob), staleness (the admission gate and the
versioned buffer; pure), transport (weight transports behind one interface, each sync checked by a digest),
workers (the Ray actors wrapping the roles), runner (the topologies; `RaySystem` stands where `rlpt train`
keeps its Controller), streaming (the async driver), ddp (data-parallel trainer workers:
system.trainer_workers), partial (partial rollouts, per-token versions: system.partial_rollouts), restart
(replacing dead rollout workers: system.max_restarts). Ray is imported lazily: nothing here needs it until a
Ray topology runs.
"""
