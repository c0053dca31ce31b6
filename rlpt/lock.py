"""Who may write a run folder: one process at a time (an exclusive `flock` on rlpt.lock holding its PID), and only
a new or empty folder or one of rlpt's own runs (rlpt writes only among files it wrote). rlpt.run's Run claims
its folder here; the pipeline claims its folder of runs the same way.

    lock, created = claim_folder(Path("runs/grpo"))   # RunFolderError if another process holds it
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from rlpt.validate import ConfigError

LOCK = "rlpt.lock"


class RunFolderError(FileExistsError):
    """The run folder cannot be used as asked (busy, not rlpt's, already holds checkpoints); nothing was changed."""


# -- what a step boundary saves beside the weights ---------------------------------------------------


# -- the run folder: ownership and the lock -------------------------------------------------------------
class FolderLock:
    """An exclusive `flock` on <folder>/rlpt.lock, which holds the holder's PID while it runs (empty after a
    clean exit). The kernel drops a flock when its process dies, so a PID found in a lock we could take is
    a killed run's: taken over, and said so. The file is never deleted: a lock file removed while another
    process has it open would let a third lock a new file and both would run."""

    def __init__(self, folder: Path):
        self.path, self._fh = Path(folder) / LOCK, None
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._holder()
            self._fh.close()
            self._fh = None
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunFolderError(f"run folder {str(folder)!r} is in use by another rlpt process (PID "
                                 f"{holder or 'not yet written'}): wait for it to finish, stop it, or choose "
                                 "another run.name=<new name> (nothing was changed)") from None
        if stale := self._holder():
            print(f"[rlpt] {folder}: took over the lock of PID {stale}, which no longer runs (killed?)")
        self._fh.truncate(0)
        self._fh.write(f"{os.getpid()}\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def _holder(self) -> str:
        self._fh.seek(0)
        return self._fh.read().strip()

    def release(self) -> None:
        if self._fh is not None:
            self._fh.truncate(0)
            self._fh.flush()
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __del__(self):   # a Run dropped without close() (an exception in a caller) still frees its folder
        try:
            self.release()
        except (OSError, ValueError, TypeError):
            pass


def claim_folder(folder: Path) -> tuple[FolderLock, bool]:
    """Lock `folder` for this process, creating it if needed; returns (lock, whether this call created it).
    Refused: a non-empty folder that is not an rlpt run (rlpt never writes among files it did not write)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"run folder {str(folder)!r} is a file: set run.out_dir / run.name to a folder")
    # from before rlpt.lock: a run (checkpoints/latest), or an RL run's or a pipeline's folder of runs
    ours = (folder / LOCK).is_file() or (folder / "checkpoints" / "latest").is_file() or \
        (folder.is_dir() and any(folder.glob("*/checkpoints/latest")))
    if folder.is_dir() and not ours and any(folder.iterdir()):
        raise RunFolderError(f"{str(folder)!r} holds files and is not an rlpt run folder (no {LOCK}): rlpt "
                             "writes only into a new or empty folder or one of its own runs; choose another "
                             "run.name=<new name> or run.out_dir (nothing was changed)")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return FolderLock(folder), created
    except RunFolderError:
        raise
    except OSError as e:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError(f"cannot write the run folder {str(folder)!r}: {e.strerror} (set run.out_dir to a "
                          "writable folder)") from None
