"""The algorithms, one file each; importing this package registers them with the framework."""
from rlpt.algorithms import grpo  # noqa: F401
