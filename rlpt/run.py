"""A run is a folder: resolved config, metrics, TensorBoard events, checkpoints, a report.

    runs/<name>/rlpt.lock              marks an rlpt run folder; holds the PID of the process running in it
    runs/<name>/config.yaml            the resolved config (every default written out)
    runs/<name>/metrics.jsonl          one JSON object per logged step: {"step": 10, "loss/sft": ...}
    runs/<name>/tb/                    TensorBoard events of the same scalars
    runs/<name>/checkpoints/           step_N/, latest, finished (their layout: rlpt/checkpoint.py)
    runs/<name>/report.md              written at the end

What a run folder promises (docs/reliability.md; each is pinned by tests/test_run.py or tests/test_crash.py):
- one process at a time: an exclusive `flock` on rlpt.lock (the kernel drops it when its holder dies, so
  a killed run's lock is simply taken over); rlpt writes only into a new or empty folder or one of its own
  runs, and deletes only files it wrote;
- a kill at any moment loses at most the steps since the last checkpoint (rlpt/checkpoint.py: atomic,
  checksummed saves; start-up repairs what a kill left; a corrupt newest checkpoint falls back to a good one);
- `--resume` continues bit-identically, so a resumed run equals an uninterrupted one tensor for tensor:
  metrics after the checkpoint's step (and a half-written last line) are dropped, and a config that
  differs from the folder's config.yaml is refused unless the changed keys are allowed by name;
- SIGTERM is the first Ctrl-C (save at the step boundary, stop), a signal never interrupts a save, and
  non-finite weights are never saved.
"""
from __future__ import annotations

import json
import random
import shutil
import signal
import threading
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch
import yaml

from rlpt.checkpoint import (
    STOP_SIGNALS,
    latest_checkpoint,
    load_state,
    load_weights,
    newest_good_checkpoint,
    recover_checkpoints,
    save_step,
    step_dirs,
    write_atomic,
)
from rlpt.config import ConfigError, dump_config
from rlpt.errors import StopRequested  # defined without torch, for the CLI
from rlpt.lock import LOCK, FolderLock, RunFolderError, claim_folder  # noqa: F401 - re-exported

ALWAYS_ALLOWED = ("run.name", "run.out_dir", "run.progress")   # where the folder is and how it shows progress


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def training_state(step: int, opt, sched, data_rng: random.Random) -> dict:
    """What a supervised-style job (SFT, DPO, RM) saves beside its weights to resume bit-identically."""
    return {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
            "data_rng": data_rng.getstate()}


def restore_training(run: Run, ckpt: Path, model: torch.nn.Module, opt, sched, data_rng: random.Random) -> dict:
    """The inverse of `training_state`: weights, optimizer, schedule and every RNG from `ckpt`; metrics
    logged after it are dropped. Returns the saved state (its "step" is where to continue)."""
    load_weights(ckpt, model)
    state = load_state(ckpt)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    data_rng.setstate(state["data_rng"])
    run.keep_metrics(state["step"], state.get("metrics_rows"))
    print(f"[rlpt] resumed {run.dir} from {ckpt.name} (step {state['step']})")
    return state


class Stateless:
    """The neutral `state_dict` / `load_state_dict` of a part that keeps nothing across steps (most algorithms
    and envs): a checkpoint stores {} for it, and resuming it from anything else is an error, not a silent drop."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state across steps, but was given {sorted(state)}")


def config_changes(old: dict, new: dict, prefix: str = "", defaults: dict | None = None) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for every leaf that differs between two config trees. With `defaults`
    (the schema's default tree): a key the old config lacks (a folder written before rlpt had that key) whose
    new value is its default is no change: that run ran with what the default now says."""
    out = {}
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        d = defaults.get(k) if isinstance(defaults, dict) else None
        if k not in old and defaults is not None and k in defaults and b == d:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out |= config_changes(a, b, f"{prefix}{k}.", d if isinstance(d, dict) else None)
        elif a != b:
            out[f"{prefix}{k}"] = (a, b)
    return out


def _default_tree(config) -> dict | None:
    """The config's schema at its defaults, as config.yaml would hold it; None when it has no defaults."""
    try:
        return yaml.safe_load(dump_config(type(config)())) or {}
    except (ValueError, TypeError):   # a schema with required fields (ValidationError): every key then counts
        return None


def _allowed(key: str, allow: Collection[str]) -> bool:
    # a section name allows every key under it: --allow-change eval allows eval.every and eval.size
    return any(key == a or key.startswith(a + ".") for a in (*allow, *ALWAYS_ALLOWED))


class Run:
    """One job's run folder, locked for the job's lifetime. `resume_from` is the checkpoint to continue from
    (None: a fresh start), already checked; config.yaml is (re)written by `begin`, when training starts."""

    def __init__(self, out_dir: str | Path, name: str, config, resume: bool = False,
                 allow_change: Collection[str] = ()):
        self.dir = Path(out_dir) / name
        self.ckpt_dir = self.dir / "checkpoints"
        self.metrics_path = self.dir / "metrics.jsonl"
        self.resume = resume
        self._config = dump_config(config)
        self._defaults = _default_tree(config)
        self._tb, self._purge_step, self._keep = None, None, None
        if not resume:
            self._refuse_checkpoints()                        # before touching anything
        self._lock, self._created = claim_folder(self.dir)
        try:
            if not resume:
                self._refuse_checkpoints()                    # again, now that it is ours alone
            elif (self.ckpt_dir / "latest").exists() or step_dirs(self.ckpt_dir):
                self._check_config(allow_change)
            recover_checkpoints(self.ckpt_dir)
            for leftover in ("config.yaml.tmp", "metrics.jsonl.tmp"):   # of a write_atomic a kill cut short
                (self.dir / leftover).unlink(missing_ok=True)
            self.resume_from = newest_good_checkpoint(self.ckpt_dir) if resume else None
            if self.resume_from is None:    # a fresh start: drop what an earlier, checkpoint-less attempt logged
                if resume:
                    print(f"[rlpt] --resume: no checkpoint in {self.dir}, starting from step 0")
                self.metrics_path.unlink(missing_ok=True)
                shutil.rmtree(self.dir / "tb", ignore_errors=True)
        except BaseException:
            self.abandon()
            raise

    def _refuse_checkpoints(self) -> None:
        if (self.ckpt_dir / "latest").exists() or step_dirs(self.ckpt_dir):
            raise RunFolderError(
                f"run folder {str(self.dir)!r} already holds checkpoints; pass --resume to continue it, "
                f"or choose another name with run.name=<new name> (nothing was changed)")

    def _check_config(self, allow: Collection[str]) -> None:
        saved = self.dir / "config.yaml"
        if not saved.is_file():
            return
        changes = config_changes(yaml.safe_load(saved.read_text()) or {}, yaml.safe_load(self._config) or {},
                                 defaults=self._defaults)
        refused = [k for k in changes if not _allowed(k, allow)]
        if refused:
            listed = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
            raise ConfigError(f"--resume with a config that differs from {str(saved)!r}: {listed}. Resume with "
                              f"the saved values, or pass --allow-change {','.join(refused)} to continue with the "
                              "new ones (nothing was changed)")
        for k in changes:
            if k not in ALWAYS_ALLOWED:
                print(f"[rlpt] --resume: {k} changes from {changes[k][0]!r} to {changes[k][1]!r} (allowed)")

    def begin(self, start: int, total: int) -> None:
        """Training starts at `start` of `total` steps: check that, then write config.yaml (only now, so a
        command that fails before training never rewrites it)."""
        if start > total:
            raise ConfigError(f"{str(self.dir)!r} is at step {start}, past this job's {total} steps: resume with "
                              f"at least {start} steps, or start a new run with another run.name")
        if self._keep is not None:
            self.truncate_metrics(*self._keep)
            self._keep = None
        write_atomic(self.dir / "config.yaml", self._config)

    def abandon(self) -> None:
        """After a failure before training: release the folder, and remove it if this command created it and
        no checkpoint was saved in it (a failed command leaves no new run folder behind)."""
        self.close()
        if self._created and not any(p.parent.name == "checkpoints" for p in self.dir.rglob("latest")):
            shutil.rmtree(self.dir, ignore_errors=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if getattr(self, "_lock", None) is not None:
            self._lock.release()

    # -- metrics -------------------------------------------------------------------------------
    def tb(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.dir / "tb"), purge_step=self._purge_step)
        return self._tb

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float, np.floating)) else v)
                                for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")   # one write: a kill leaves at most one partial last line
        for k, v in row.items():
            if k != "step" and isinstance(v, float):
                self.tb().add_scalar(k, v, step)

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def keep_metrics(self, step: int, rows: int | None = None) -> None:
        """On resume from checkpoint `step`: `truncate_metrics` once training begins (a command that fails
        before, e.g. on too few steps, leaves the metrics as they were)."""
        self._keep = (step, rows)

    def truncate_metrics(self, step: int, rows: int | None = None) -> None:
        """Keep the metrics as they were when checkpoint `step` was saved: its first `rows` rows (the row count
        it recorded; without one, those up to `step`). A resume from it logs the rest again, the closing rows
        of a job that finished included."""
        rows = [r for r in self.read_metrics()[:rows] if r["step"] <= step]
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        self._purge_step = step + 1

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, step: int, model, model_meta: dict, state: dict, keep: int = 2) -> Path:
        """Save step `step` (`save_step`: atomic, then `latest`, then pruning to the `keep` newest)."""
        state = state | {"metrics_rows": len(self.read_metrics())}   # what a resume from it keeps
        return save_step(self.ckpt_dir, step, model, model_meta, state, keep)

    def finish(self) -> None:
        """The job ran to its end, closing evaluation and metrics included: `finished_checkpoint` may skip it."""
        write_atomic(self.ckpt_dir / "finished", latest_checkpoint(self.dir).name)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.dir)


def read_metrics(path: Path) -> list[dict]:
    """The complete rows of a metrics.jsonl: a last line without its newline (a kill mid-write) is left out."""
    if not Path(path).exists():
        return []
    lines = Path(path).read_text().split("\n")[:-1]   # the piece after the last newline is partial or empty
    return [json.loads(line) for line in lines if line.strip()]


# -- signals ---------------------------------------------------------------------------------------------
class GracefulInterrupt:
    """First Ctrl-C or SIGTERM (what cluster schedulers send): finish the current step, save, stop.
    A second: stop at once (StopRequested, one line, no traceback).

    Saving only at step boundaries is what makes a resume after Ctrl-C bit-identical: a step cut
    in half (optimizer stepped, schedule not) could not be replayed exactly.
    """

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def _handle(self, signum, frame):
        name = STOP_SIGNALS.get(signum, f"signal {signum}")
        if self.requested:
            raise StopRequested(f"stopped at once by a second {name}: the steps after the last checkpoint are "
                                "lost; continue with --resume")
        self.requested = True
        print(f"\n[rlpt] {name}: finishing this step, then saving a checkpoint ({name} again to stop at once)",
              flush=True)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False
