"""The errors the command line turns into one line and an exit status, importable without torch: `rlpt lab` and
`rlpt --help` must answer before torch (seconds to import) is loaded. Each is raised where its module says and
re-exported there (rlpt.checkpoint.CheckpointError, rlpt.framework.controller.LogpMismatchError,
rlpt.run.StopRequested), so code imports it from either place.
"""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written as asked (missing, corrupt, not rlpt's): exit 2."""


class LogpMismatchError(RuntimeError):
    """The trainer's log-probs disagree with the rollout's old_logp right after a sync (rlpt.framework.controller):
    the run stops, exit 3."""


class StopRequested(KeyboardInterrupt):
    """Raised at a step boundary after Ctrl-C or SIGTERM, once the checkpoint of that boundary is saved; or at
    once after a second one. The CLI prints its message on one line and exits 130."""
