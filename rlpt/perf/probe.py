"""Peak memory of a block of code, cheaply enough to run around every role of every step (lesson 28, step 4).

    with PeakMemory() as pm:  role()
    pm.peak_bytes   the highest memory in use during the block, and `pm.source` says what was measured:
      "cuda"   torch.cuda.max_memory_allocated(), its peak reset at the block's start (lesson 28's mem/peak_gb)
      "vmhwm"  Linux CPU: the process's resident set high-water mark (VmHWM in /proc/self/status), reset at the
               block's start by writing 5 to /proc/self/clear_refs (~40 µs): the block's true peak RSS,
               which includes everything resident before it (interpreter, libraries, weights)
      "maxrss" elsewhere: how far getrusage's ru_maxrss rose in the block, a lower bound (it only moves on a
               new process record, and a child process starts with its parent's record)
    pm.start_bytes  what was in use when the block began (same measure), so peak − start is what it added.

tracemalloc would see every allocation but slows a step several-fold. torch is imported only when CUDA is
already in use.
"""
from __future__ import annotations

import resource
import sys

_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Resident set now (Linux), else the process's maxrss."""
    kib = _status_kib("VmRSS:")
    return kib * 1024 if kib is not None else rss_peak_bytes()


def rss_peak_bytes() -> int:
    """The process's resident-set record since start (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cuda():
    torch = sys.modules.get("torch")   # never import torch just to find out there is no GPU
    return torch if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None


class PeakMemory:
    def __init__(self):
        self.peak_bytes, self.start_bytes, self.source = 0, 0, "maxrss"

    def __enter__(self) -> PeakMemory:
        cuda = _cuda()
        if cuda:
            self.source = "cuda"
            cuda.cuda.reset_peak_memory_stats()
            self.start_bytes = cuda.cuda.memory_allocated()
        elif _reset_hwm():
            self.source, self.start_bytes = "vmhwm", rss_bytes()
        else:
            self.source, self.start_bytes = "maxrss", rss_peak_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.source == "cuda":
            self.peak_bytes = _cuda().cuda.max_memory_allocated()
        elif self.source == "vmhwm":
            self.peak_bytes = (_status_kib("VmHWM:") or 0) * 1024
        else:
            self.peak_bytes = rss_peak_bytes()
