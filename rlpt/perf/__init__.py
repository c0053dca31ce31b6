"""`rlpt.perf`: where the time and memory of an RL step go (lessons 20, 22, 22a–c, 28), as pure functions.

    configs.py     model shapes: named sizes (1–700 B), a HF config.json, an rlpt run folder
    memory.py      bytes per parameter, activations, KV cache, RL's four copies, lesson 22's memory widget
    flops.py       2P / 6P / 8P per token, MFU, MBU, a decode step against bandwidth
    throughput.py  the per-role step equation per topology, balance, max-of-K stragglers, the allocator
    diagnose.py    `rlpt diagnose RUN`: lesson 23's failure modes and lesson 28's playbook on a run's metrics
    cli.py         `rlpt perf memory|throughput|kv` and `rlpt diagnose`

Floor 0: nothing here imports torch (a run folder is read as YAML, JSON and safetensors headers).
"""
