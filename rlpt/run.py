"""A run is a folder: resolved config, metrics, TensorBoard events, checkpoints, a report.

    runs/<name>/rlpt.lock              marks an rlpt run folder; holds the PID of the process running in it
    runs/<name>/config.yaml            the resolved config (every default written out)
    runs/<name>/metrics.jsonl          one JSON object per logged step: {"step": 10, "loss/sft": ...}
    runs/<name>/tb/                    TensorBoard events of the same scalars
    runs/<name>/checkpoints/step_N/    model.safetensors + state.pt (optimizer, schedule, RNG, loop state)
                                       + manifest.json (the sha256 of both, checked on every load)
    runs/<name>/checkpoints/latest     name of the newest complete checkpoint
    runs/<name>/checkpoints/finished   name of the checkpoint whose job also ran its closing phase
    runs/<name>/report.md              written at the end

What a run folder promises (docs/reliability.md; each is pinned by tests/test_run.py or tests/test_crash.py):
- one process at a time: an exclusive `flock` on rlpt.lock (the kernel drops it when its holder dies, so
  a killed run's lock is simply taken over); rlpt writes only into a new or empty folder or one of its own
  runs, and deletes only files it wrote;
- a kill at any moment loses at most the steps since the last checkpoint: a checkpoint is written into
  `.tmp-step_N`, fsynced, renamed into place, and only then does `latest` move (write + os.replace);
  start-up finishes or removes whatever a kill left half done, and a corrupt newest checkpoint falls back
  to the newest good one;
- `--resume` continues bit-identically, so a resumed run equals an uninterrupted one tensor for tensor:
  metrics after the checkpoint's step (and a half-written last line) are dropped, and a config that
  differs from the folder's config.yaml is refused unless the changed keys are allowed by name;
- SIGTERM is the first Ctrl-C (save at the step boundary, stop), a signal never interrupts a save, and
  non-finite weights are never saved.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from rlpt.config import ConfigError, dump_config

FORMAT = "rlpt-checkpoint-v1"
LOCK = "rlpt.lock"
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "state.pt")   # what a checkpoint holds; the manifest holds their sha256
STEP_DIR = re.compile(r"step_(\d+)")
HIDDEN_DIR = re.compile(r"\.(tmp|old)-(step_\d+)(-\d+)?")   # a save in progress (-PID: rlpt before manifests)
ALWAYS_ALLOWED = ("run.name", "run.out_dir", "run.progress")   # where the folder is and how it shows progress


class CheckpointError(RuntimeError):
    pass


class RunFolderError(FileExistsError):
    """The run folder cannot be used as asked (busy, not rlpt's, already holds checkpoints); nothing was changed."""


# -- what a step boundary saves beside the weights ---------------------------------------------------
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


# -- checkpoints: atomic, checksummed, never non-finite ----------------------------------------------
def save_checkpoint(path: Path, model: torch.nn.Module, model_meta: dict, state: dict) -> Path:
    """Write `path` atomically: weights as safetensors (metadata: format + model config), state via torch,
    and a manifest with the sha256 of both, all fsynced in `.tmp-<name>` before one rename puts it in place.
    A step saved again (the reward model's calibrated final) moves the old copy to `.old-<name>` first, so
    a kill between the two renames leaves two complete copies for `recover_checkpoints`."""
    path = Path(path)
    _refuse_non_finite(model, path)
    tmp, old = path.parent / f".tmp-{path.name}", path.parent / f".old-{path.name}"
    with signals_deferred():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"),
                   metadata={"format": FORMAT, "model": json.dumps(model_meta, sort_keys=True)})
        torch.save(state, tmp / "state.pt")
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "sha256": {f: _sha256(tmp / f) for f in FILES}},
                                               indent=1) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            _fsync(path.parent)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
            _fsync(path.parent)
    return path


def _refuse_non_finite(model: torch.nn.Module, path: Path) -> None:
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"not saving {path.name}: the weights hold NaN or inf ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}); the run diverged (lower the learning rate). "
                              "The checkpoints already saved are untouched")


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: a reader (or a kill) sees the old file or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def checkpoint_problem(path: Path, files: Collection[str] = FILES) -> str | None:
    """Why checkpoint folder `path` cannot be trusted (a file missing, or not matching its manifest's sha256),
    or None. A checkpoint from before manifests passes if its files are there."""
    path = Path(path)
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    if not (path / MANIFEST).is_file():
        return None
    try:
        want = json.loads((path / MANIFEST).read_text())["sha256"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"unreadable {MANIFEST} ({e})"
    bad = [f for f in files if want.get(f) != _sha256(path / f)]
    return f"{', '.join(bad)} does not match the sha256 in {MANIFEST}" if bad else None


def read_checkpoint_meta(path: str | Path) -> dict:
    """The model config stored with a checkpoint's weights; a clear error for anything else."""
    f = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    if not f.exists():
        raise CheckpointError(f"no checkpoint at {str(path)!r}: expected a folder holding model.safetensors "
                              "(for example runs/sft/checkpoints/step_600), or a run folder")
    try:
        from safetensors import safe_open
        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(f)!r} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(f)!r} is not an rlpt checkpoint (metadata format={meta.get('format')!r}, "
                              f"expected {FORMAT!r}); to import a Hugging Face model use rlpt.models.hf")
    return json.loads(meta["model"])


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into `model`, checking their sha256, names and shapes first."""
    f = Path(path) / "model.safetensors"
    if f.is_file() and (problem := checkpoint_problem(Path(path), ["model.safetensors"])):
        raise CheckpointError(f"cannot read weights from {str(f)!r} (truncated or corrupt?): {problem}")
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read weights from {str(f)!r} (truncated or corrupt?): {e}") from None
    own = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in tensors and not _is_tied_alias(model, k, tensors)]
    unexpected = [k for k in tensors if k not in own]
    if bad or missing or unexpected:
        parts = (["shape mismatch: " + "; ".join(bad[:4])] if bad else []) + \
                (["missing: " + ", ".join(missing[:4])] if missing else []) + \
                (["unexpected: " + ", ".join(unexpected[:4])] if unexpected else [])
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model ({' | '.join(parts)}). "
                              "Use the model config the checkpoint was trained with (its run's config.yaml).")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def _is_tied_alias(model, key, tensors) -> bool:
    # save_model stores one name for tied tensors; the other must share storage with a saved one
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(key)
    return p is not None and any(params.get(k) is not None and params[k].data_ptr() == p.data_ptr()
                                 for k in tensors)


def load_state(path: Path) -> dict:
    f = Path(path) / "state.pt"
    problem = checkpoint_problem(Path(path), ["state.pt"]) if f.is_file() else None
    try:
        if problem:
            raise ValueError(problem)
        return torch.load(f, weights_only=False)
    except Exception as e:   # noqa: BLE001 - any unreadable pickle is the same user-facing problem
        raise CheckpointError(f"cannot read training state {str(f)!r} (truncated or corrupt?): {e}") from None


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """The checkpoint folders step_N, oldest first by N (not by name: step_1000000000 sorts after step_99999999)."""
    found = [p for p in ckpt_dir.glob("step_*") if p.is_dir() and STEP_DIR.fullmatch(p.name)] \
        if ckpt_dir.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def recover_checkpoints(ckpt_dir: Path) -> None:
    """Finish or undo what a kill left of a save: a complete `.tmp-step_N` (its manifest checks) or a moved-aside
    `.old-step_N` whose step_N is missing becomes step_N again; every other leftover is removed."""
    if not ckpt_dir.is_dir():
        return
    hidden = sorted((p for p in ckpt_dir.iterdir() if HIDDEN_DIR.fullmatch(p.name)),
                    key=lambda p: p.name.startswith(".old"))   # .tmp (the newer copy) first
    for p in hidden:
        kind, name, legacy = HIDDEN_DIR.fullmatch(p.name).groups()
        final = ckpt_dir / name
        complete = kind == "old" or (not legacy and (p / MANIFEST).is_file() and checkpoint_problem(p) is None)
        if complete and not final.exists():
            os.replace(p, final)
            print(f"[rlpt] recovered {final} from a save a kill interrupted")
        else:
            shutil.rmtree(p, ignore_errors=True)
    (ckpt_dir / "latest.tmp").unlink(missing_ok=True)


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


def config_changes(old: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for every leaf that differs between two config trees."""
    out = {}
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out |= config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out[f"{prefix}{k}"] = (a, b)
    return out


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
            self.resume_from = self._newest_good() if resume else None
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
        changes = config_changes(yaml.safe_load(saved.read_text()) or {}, yaml.safe_load(self._config) or {})
        refused = [k for k in changes if not _allowed(k, allow)]
        if refused:
            listed = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
            raise ConfigError(f"--resume with a config that differs from {str(saved)!r}: {listed}. Resume with "
                              f"the saved values, or pass --allow-change {','.join(refused)} to continue with the "
                              "new ones (nothing was changed)")
        for k in changes:
            if k not in ALWAYS_ALLOWED:
                print(f"[rlpt] --resume: {k} changes from {changes[k][0]!r} to {changes[k][1]!r} (allowed)")

    def _newest_good(self) -> Path | None:
        """The newest checkpoint whose files match their manifest; a corrupt newer one is moved aside to
        checkpoints/corrupt-step_N (kept for a look, out of the way) and named in a warning."""
        found = step_dirs(self.ckpt_dir)
        if not found:
            return None
        bad = []
        for ck in reversed(found):
            problem = checkpoint_problem(ck)
            if problem is None:
                break
            bad.append(f"{ck.name} ({problem})")
            aside = self.ckpt_dir / f"corrupt-{ck.name}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(ck, aside)
        else:
            raise CheckpointError(f"no readable checkpoint in {str(self.ckpt_dir)!r}: {'; '.join(bad)}; they were "
                                  "moved to corrupt-step_N. Start a new run (another run.name)")
        if bad:
            print(f"[rlpt] warning: checkpoint {'; '.join(bad)} is corrupt; resuming from {ck.name}, the newest "
                  "good one (the corrupt copy is kept as corrupt-<name>)")
        if latest_checkpoint(self.dir) != ck:
            write_atomic(self.ckpt_dir / "latest", ck.name)
        return ck

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
        """Save step `step`, point `latest` at it (only once it is complete), then prune by step number
        to the `keep` newest, never the one just saved."""
        state = state | {"metrics_rows": len(self.read_metrics())}   # what a resume from it keeps
        with signals_deferred():
            path = save_checkpoint(self.ckpt_dir / f"step_{step:08d}", model, model_meta, state)
            write_atomic(self.ckpt_dir / "latest", path.name)
            for old in step_dirs(self.ckpt_dir)[:-keep]:
                if old != path:
                    shutil.rmtree(old)
        return path

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


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ptr = Path(run_dir) / "checkpoints" / "latest"
    if not ptr.exists():
        return None
    return Path(run_dir) / "checkpoints" / ptr.read_text().strip()


def finished_checkpoint(run_dir: str | Path, steps: int) -> Path | None:
    """The run's latest checkpoint if the job is done: it reached `steps` and ran its closing phase (a kill
    between the last save and the closing metrics leaves it unfinished). Else None, also when the checkpoint
    is missing or unreadable: running the job with --resume then finishes, recovers or reports it."""
    ck = latest_checkpoint(run_dir)
    done = Path(run_dir) / "checkpoints" / "finished"
    if ck is None or not done.is_file() or done.read_text().strip() != ck.name:
        return None
    try:
        return ck if ck is not None and load_state(ck)["step"] >= steps else None
    except CheckpointError:
        return None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run folder (takes its latest checkpoint)."""
    p = Path(path)
    if (p / "model.safetensors").exists():
        return p
    ck = latest_checkpoint(p)
    if ck is not None:
        return ck
    raise CheckpointError(f"no checkpoint at {str(p)!r}: expected a checkpoint folder (with model.safetensors) "
                          "or a run folder with checkpoints/latest")


# -- signals ---------------------------------------------------------------------------------------------
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then deliver them to the handlers that were in place: a
    save is never cut in half by a signal (a Ctrl-C during the final save used to lose the run)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in got:
            if callable(old[s]):
                old[s](s, None)
            elif old[s] == signal.SIG_DFL:
                signal.raise_signal(s)


class StopRequested(KeyboardInterrupt):
    """Raised at a step boundary after Ctrl-C or SIGTERM, once the checkpoint of that boundary is saved; or at
    once after a second one. The CLI prints its message on one line and exits 130."""


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
