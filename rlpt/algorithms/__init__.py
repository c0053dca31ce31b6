"""The algorithms, one file each; importing this package registers them with the framework.

Lineage (lessons 09–14), each file a small patch of its predecessor:
    reinforce -> ppo -> grpo -> rloo, dapo, drgrpo
"""
from rlpt.algorithms import dapo, drgrpo, grpo, ppo, reinforce, rloo  # noqa: F401

# the order the lessons teach them (and `rlpt compare` lists them); registration order follows imports
LINEAGE = ("reinforce", "ppo", "grpo", "rloo", "dapo", "drgrpo")
