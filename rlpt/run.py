"""A run is a folder: resolved config, metrics, TensorBoard events, checkpoints, a report.

    runs/<name>/config.yaml            the resolved config (every default written out)
    runs/<name>/metrics.jsonl          one JSON object per logged step: {"step": 10, "loss/sft": ...}
    runs/<name>/tb/                    TensorBoard events of the same scalars
    runs/<name>/checkpoints/step_N/    model.safetensors + state.pt (optimizer, schedule, RNG, loop state)
    runs/<name>/checkpoints/latest     name of the newest complete checkpoint
    runs/<name>/report.md              written at the end

A checkpoint is written into a temporary folder and renamed into place, and `latest` is replaced
atomically, so a crash or Ctrl-C mid-write never leaves a half checkpoint where a resume would
look. Resuming truncates metrics.jsonl back to the checkpoint's step, so a resumed run's metrics
file equals an uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from rlpt.config import dump_config

FORMAT = "rlpt-checkpoint-v1"


class CheckpointError(RuntimeError):
    pass


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


def restore_training(run: Run, ckpt: Path, model: torch.nn.Module, opt, sched, data_rng: random.Random) -> int:
    """The inverse of `training_state`: weights, optimizer, schedule and every RNG from `ckpt`; metrics
    logged after it are dropped. Returns the step to continue from."""
    load_weights(ckpt, model)
    state = load_state(ckpt)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    data_rng.setstate(state["data_rng"])
    run.truncate_metrics(state["step"])
    print(f"[rlpt] resumed {run.dir} from {ckpt.name} (step {state['step']})")
    return state["step"]


class Stateless:
    """The neutral `state_dict` / `load_state_dict` of a part that keeps nothing across steps (most algorithms
    and envs): a checkpoint stores {} for it, and resuming it from anything else is an error, not a silent drop."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state across steps, but was given {sorted(state)}")


def save_checkpoint(path: Path, model: torch.nn.Module, model_meta: dict, state: dict) -> Path:
    """Write `path` atomically: weights as safetensors (metadata: format + model config), state via torch."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"),
               metadata={"format": FORMAT, "model": json.dumps(model_meta, sort_keys=True)})
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.exists():   # an older checkpoint of the same step: move it aside, never delete first
        old = path.parent / f".old-{path.name}-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


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
    """Load a checkpoint's weights into `model`, checking names and shapes first."""
    f = Path(path) / "model.safetensors"
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


class Run:
    def __init__(self, out_dir: str | Path, name: str, config, resume: bool = False):
        self.dir = Path(out_dir) / name
        self.ckpt_dir = self.dir / "checkpoints"
        self.resume = resume
        if self.dir.exists() and not resume and (self.ckpt_dir / "latest").exists():
            raise FileExistsError(
                f"run folder {str(self.dir)!r} already holds checkpoints; pass --resume to continue it, "
                f"or choose another name with run.name=<new name> (nothing was changed)")
        self.dir.mkdir(parents=True, exist_ok=True)
        if not resume:   # a fresh run: drop what an earlier, checkpoint-less attempt logged
            self.metrics_path_unlink()
        (self.dir / "config.yaml").write_text(dump_config(config))
        self.metrics_path = self.dir / "metrics.jsonl"
        self._tb = None

    # -- metrics -------------------------------------------------------------------------------
    def metrics_path_unlink(self) -> None:
        (self.dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(self.dir / "tb", ignore_errors=True)

    def tb(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.dir / "tb"))
        return self._tb

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float, np.floating)) else v)
                                for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, float):
                self.tb().add_scalar(k, v, step)

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, step: int) -> None:
        rows = [r for r in self.read_metrics() if r["step"] <= step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics_path)
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.dir / "tb"), purge_step=step + 1)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, step: int, model, model_meta: dict, state: dict, keep: int = 2) -> Path:
        path = save_checkpoint(self.ckpt_dir / f"step_{step:08d}", model, model_meta, state)
        tmp = self.ckpt_dir / "latest.tmp"
        tmp.write_text(path.name)
        os.replace(tmp, self.ckpt_dir / "latest")
        done = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())
        for old in done[:-keep]:   # only after the new one is complete
            shutil.rmtree(old, ignore_errors=True)
        return path

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.dir)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ptr = Path(run_dir) / "checkpoints" / "latest"
    if not ptr.exists():
        return None
    return Path(run_dir) / "checkpoints" / ptr.read_text().strip()


def finished_checkpoint(run_dir: str | Path, steps: int) -> Path | None:
    """The run's latest checkpoint if it has reached `steps` (the job is done), else None."""
    ck = latest_checkpoint(run_dir)
    return ck if ck is not None and load_state(ck)["step"] >= steps else None


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


def load_state(path: Path) -> dict:
    try:
        return torch.load(Path(path) / "state.pt", weights_only=False)
    except Exception as e:   # noqa: BLE001 - any unreadable pickle is the same user-facing problem
        raise CheckpointError(f"cannot read training state {str(Path(path) / 'state.pt')!r} "
                              f"(truncated or corrupt?): {e}") from None


class StopRequested(KeyboardInterrupt):
    """Raised at a step boundary after Ctrl-C, once the checkpoint of that boundary is saved."""


class GracefulInterrupt:
    """First Ctrl-C: finish the current step, save, stop. Second Ctrl-C: stop at once.

    Saving only at step boundaries is what makes a resume after Ctrl-C bit-identical: a step cut
    in half (optimizer stepped, schedule not) could not be replayed exactly.
    """

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[rlpt] Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        import signal
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False
