"""Checkpoints: a step's weights and training state in one folder, saved so that no kill can break them.

    checkpoints/step_N/     model.safetensors (metadata: format + model config) + state.pt (optimizer, schedule,
                            RNG, loop state) + manifest.json (the sha256 of both, checked on every load)
    checkpoints/latest      name of the newest complete checkpoint
    checkpoints/finished    name of the checkpoint whose job also ran its closing phase

A save is atomic: written into `.tmp-step_N`, fsynced, renamed into place (rename(2) is all or nothing), and
only then does `latest` move (write + os.replace); Ctrl-C and SIGTERM wait until it is done. Start-up finishes
or removes what a kill left half done (`recover_checkpoints`), a corrupt newest checkpoint falls back to the
newest good one (`newest_good_checkpoint`), pruning goes by step number and never drops the newest, and
non-finite weights are never saved (docs/reliability.md; the run folder around them is rlpt/run.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from rlpt.errors import CheckpointError  # defined without torch, for the CLI

FORMAT = "rlpt-checkpoint-v1"
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "state.pt")   # what a checkpoint holds; the manifest holds their sha256
STEP_DIR = re.compile(r"step_(\d+)")
HIDDEN_DIR = re.compile(r"\.(tmp|old)-(step_\d+)(-\d+)?")   # a save in progress (-PID: rlpt before manifests)
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


# -- saving: atomic, checksummed, never non-finite -------------------------------------------------------
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
        try:
            save_model(model, str(tmp / "model.safetensors"),
                       metadata={"format": FORMAT, "model": json.dumps(model_meta, sort_keys=True)})
            torch.save(state, tmp / "state.pt")
            (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "sha256": {f: _sha256(tmp / f) for f in FILES}},
                                                   indent=1) + "\n")
            for f in tmp.iterdir():
                _fsync(f)
            _fsync(tmp)
        except BaseException:   # a full disk: the half-written copy must not keep the space the disk lacks
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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


def newest_good_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint whose files match their manifest; a corrupt newer one is moved aside to
    checkpoints/corrupt-step_N (kept for a look, out of the way) and named in a warning."""
    found = step_dirs(ckpt_dir)
    if not found:
        return None
    bad = []
    for ck in reversed(found):
        problem = checkpoint_problem(ck)
        if problem is None:
            break
        bad.append(f"{ck.name} ({problem})")
        aside = ckpt_dir / f"corrupt-{ck.name}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(ck, aside)
    else:
        raise CheckpointError(f"no readable checkpoint in {str(ckpt_dir)!r}: {'; '.join(bad)}; they were "
                              "moved to corrupt-step_N. Start a new run (another run.name)")
    if bad:
        print(f"[rlpt] warning: checkpoint {'; '.join(bad)} is corrupt; resuming from {ck.name}, the newest "
              "good one (the corrupt copy is kept as corrupt-<name>)")
    if latest_checkpoint(ckpt_dir.parent) != ck:
        write_atomic(ckpt_dir / "latest", ck.name)
    return ck


def save_step(ckpt_dir: Path, step: int, model: torch.nn.Module, model_meta: dict, state: dict, keep: int) -> Path:
    """Save step `step` as checkpoints/step_N, point `latest` at it (only once it is complete), then prune by
    step number to the `keep` newest, never the one just saved."""
    with signals_deferred():
        path = save_checkpoint(ckpt_dir / f"step_{step:08d}", model, model_meta, state)
        write_atomic(ckpt_dir / "latest", path.name)
        for old in step_dirs(ckpt_dir)[:-keep]:
            if old != path:
                shutil.rmtree(old)
    return path


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


# -- a save is never cut in half by a signal -----------------------------------------------------------
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

