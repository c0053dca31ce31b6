"""The outer loop every job shares (steps, periodic eval, atomic checkpoints, Ctrl-C, progress bar),
and the skeleton of the supervised jobs on top of it (SFT, DPO, the reward model).

    for step in range(start, total):  metrics = step_fn(step);  [eval];  log;  [checkpoint]

First Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint at that step boundary and raises
`StopRequested`; the run then continues bit-identically with `--resume`. A step whose loss or gradient is
NaN or inf is skipped (no optimizer update) and counted in `step/nonfinite`. RL (`rlpt.train`) drives
`train_loop` with the controller's step; a supervised job hands `SupervisedLoop` its loss and eval, and
the skeleton does the rest: threads, seed, run folder, optimizer and schedule, resume, save, the
optimizer step, log gating, the final metrics.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection
from pathlib import Path

import torch
from tqdm import tqdm

from rlpt.config import LoopConfig
from rlpt.optim import make_optimizer
from rlpt.run import GracefulInterrupt, Run, StopRequested, restore_training, training_state


def train_loop(run: Run, start: int, total: int, step_fn: Callable[[int], dict], eval_fn: Callable[[], dict],
               save_fn: Callable[[int], object], eval_every: int, ckpt_every: int, progress: bool = True,
               desc: str = "train", show: tuple[str, ...] = ()) -> None:
    run.begin(start, total)
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        with GracefulInterrupt() as stop:
            for step in range(start, total):
                if stop.requested:
                    path = save_fn(step)
                    raise StopRequested(f"interrupted at step {step}: saved {path}; continue with --resume")
                metrics = step_fn(step)
                done = step + 1
                if done % eval_every == 0 or done == total:
                    metrics |= eval_fn()
                if metrics:
                    metrics["time/elapsed"] = time.perf_counter() - t0
                    run.log(done, metrics)
                    shown = {_label(k): f"{metrics[k]:.3g}" for k in show if k in metrics}
                    if shown:
                        bar.set_postfix(shown)
                bar.update(1)
                if done % ckpt_every == 0 and done < total:
                    save_fn(done)
            path = save_fn(total)   # inside the handler: a signal during this save waits for it (run.save)
            if stop.requested:
                raise StopRequested(f"interrupted after the last step: saved {path}; --resume finishes the job "
                                    "(its final evaluation and report)")
    except BaseException:
        run.close()   # free the folder for a resume in this same process
        raise
    finally:
        bar.close()


def _label(key: str) -> str:
    """Short progress-bar name: 'reward/mean' -> reward, 'kl/mean' -> kl, 'grad/norm' -> grad,
    'clip/frac' -> clip, 'acc/heldout' -> heldout, 'loss/sft' -> sft."""
    parts = key.split("/")
    return parts[0] if parts[-1] in ("mean", "norm", "frac") else parts[-1]


# -- the supervised skeleton: SFT, DPO and the reward model ------------------------------------------
def open_run(job, resume: bool, allow_change: Collection[str] = ()) -> tuple[Run, Path | None]:
    """Threads, the run folder (locked), the seed, and the checkpoint to continue from (None: a fresh start).

    `job` is any job config with a `run: RunConfig` section; the folder records its resolved config.
    `allow_change`: the keys (or sections) a --resume may change from the folder's config.yaml."""
    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    run = Run(job.run.out_dir, job.run.name, job, resume=resume, allow_change=allow_change)
    torch.manual_seed(job.run.seed)
    return run, run.resume_from


class SupervisedLoop:
    """One model, one loss, AdamW: the job skeleton SFT, DPO and the reward model share.

        loss, metrics = loss_fn(data_rng);  zero_grad;  backward;  clip;  opt.step (if finite);  sched.step

    A job builds its model and data, then hands over only its loss, a function of the data RNG (which
    batch to draw is the only randomness a step has), and its eval. The skeleton owns the optimizer and
    schedule, the data RNG (seeded by run.seed), checkpoints of all three beside the weights, and the
    resume from `ckpt`, so every supervised job continues bit-identically with `--resume`.
    """

    def __init__(self, run: Run, ckpt: Path | None, model: torch.nn.Module, cfg: LoopConfig, seed: int,
                 meta: dict | None = None):
        self.run, self.model, self.cfg = run, model, cfg
        self.meta = meta if meta is not None else model.cfg.to_dict()
        self.opt, self.sched = make_optimizer(model, cfg.optim, cfg.steps)
        self.data_rng = random.Random(seed)
        self.start, self.nonfinite = 0, 0   # nonfinite: steps skipped since the last logged row
        if ckpt is not None:
            state = restore_training(run, ckpt, model, self.opt, self.sched, self.data_rng)
            self.start, self.nonfinite = state["step"], state.get("nonfinite", 0)

    def save(self, step: int) -> Path:
        state = training_state(step, self.opt, self.sched, self.data_rng) | {"nonfinite": self.nonfinite}
        return self.run.save(step, self.model, self.meta, state, keep=self.cfg.keep_checkpoints)

    def step(self, step: int, loss_fn: Callable[[random.Random], tuple[torch.Tensor, dict]]) -> dict:
        """One optimizer step; its metrics only every `log_every` steps and at the last (else {})."""
        self.model.train()
        loss, metrics = loss_fn(self.data_rng)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        if torch.isfinite(loss.detach()).item() and torch.isfinite(gn).item():
            self.opt.step()
        else:   # one NaN/inf update would poison every weight (and Adam's moments) for good: skip, count
            self.nonfinite += 1
        self.sched.step()   # the schedule follows the step count, skipped steps included
        if (step + 1) % self.cfg.log_every and step + 1 != self.cfg.steps:
            return {}
        out = {**{k: float(v) for k, v in metrics.items()}, "grad/norm": gn.item(), "lr": self.sched.get_last_lr()[0]}
        if self.nonfinite:
            out["step/nonfinite"], self.nonfinite = self.nonfinite, 0
        return out

    def fit(self, loss_fn: Callable[[random.Random], tuple[torch.Tensor, dict]], eval_fn: Callable[[], dict],
            eval_every: int, final_fn: Callable[[], dict], progress: bool = True, desc: str = "train",
            show: tuple[str, ...] = ()) -> dict:
        """`train_loop` over the remaining steps, then `final_fn()` (the job's closing metrics, which
        it logs or saves as it needs); closes the run and returns them."""
        train_loop(self.run, self.start, self.cfg.steps, lambda step: self.step(step, loss_fn), eval_fn, self.save,
                   eval_every, self.cfg.ckpt_every, progress, desc=desc, show=show)
        try:
            final = final_fn()
            self.run.finish()
        finally:
            self.run.close()
        return final
