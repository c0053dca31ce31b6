"""Prompt sets for RL and their curation (lesson 18a): in RL the dataset is prompts only, and a prompt is worth
its gradient under the current policy, p(1-p) for a pass rate p.

    prompts.py     PromptRow (id, prompt, answer, source, metadata); JSONL / Parquet / HF `datasets` readers
    dedup.py       normalise; exact dedup; near-dup with MinHash LSH (datasketch)
    decontam.py    word 8- and 13-gram overlap against named eval sets
    signal.py      the per-prompt signal p(1-p)(K-1)/K, wasted samples K(p^K + (1-p)^K), degenerate groups
    difficulty.py  pass rates from K samples per prompt through the engine, Wilson intervals, the buckets
    curriculum.py  online: per-prompt p̂ from each step's groups, batches drawn ∝ max(p̂(1-p̂), floor); the
                   arithmetic operand ramp (wired into RL by rlpt.envs.curriculum, env.name=curriculum, over
                   the task's draws or a prompt file: env.curriculum.prompts)
    curate.py      the stages chained into a run folder with report.md (`rlpt data curate`), the last one a
                   stratified mix to target shares (by source, pass-rate bucket or p̂, a metadata key)
    cli.py         `rlpt data curate` and `rlpt data make-arith`
"""
