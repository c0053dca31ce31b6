"""The outer loop every job shares (steps, periodic eval, atomic checkpoints, Ctrl-C, progress bar),
and the skeleton of the supervised jobs on top of it (SFT, DPO, the reward model).

    for step in range(start, total):  metrics = step_fn(step);  [eval];  log;  [checkpoint]

First Ctrl-C finishes the current step, saves a checkpoint at that step boundary and raises
`StopRequested`; the run then continues bit-identically with `--resume`. RL (`rlpt.train`) drives
`train_loop` with the controller's step; a supervised job hands `SupervisedLoop` its loss and eval, and
the skeleton does the rest: threads, seed, run folder, optimizer and schedule, resume, save, the
optimizer step, log gating, the final metrics.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from rlpt.config import LoopConfig
from rlpt.optim import make_optimizer
from rlpt.run import GracefulInterrupt, Run, StopRequested, restore_training, training_state


def train_loop(run: Run, start: int, total: int, step_fn: Callable[[int], dict], eval_fn: Callable[[], dict],
               save_fn: Callable[[int], object], eval_every: int, ckpt_every: int, progress: bool = True,
               desc: str = "train", show: tuple[str, ...] = ()) -> None:
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        with GracefulInterrupt() as stop:
            for step in range(start, total):
                if stop.requested:
                    path = save_fn(step)
                    run.close()
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
    finally:
        bar.close()
    save_fn(total)


def _label(key: str) -> str:
    """Short progress-bar name: 'reward/mean' -> reward, 'kl/mean' -> kl, 'grad/norm' -> grad,
    'clip/frac' -> clip, 'acc/heldout' -> heldout, 'loss/sft' -> sft."""
    parts = key.split("/")
    return parts[0] if parts[-1] in ("mean", "norm", "frac") else parts[-1]


# -- the supervised skeleton: SFT, DPO and the reward model ------------------------------------------
def open_run(job, resume: bool) -> tuple[Run, Path | None]:
    """Threads, the run folder, the seed, and the checkpoint to continue from (None: a fresh start).

    `job` is any job config with a `run: RunConfig` section; the folder records its resolved config."""
    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    run = Run(job.run.out_dir, job.run.name, job, resume=resume)
    torch.manual_seed(job.run.seed)
    ckpt = run.latest_checkpoint() if resume else None
    if resume and ckpt is None:
        print(f"[rlpt] --resume: no checkpoint in {run.dir}, starting from step 0")
    return run, ckpt


class SupervisedLoop:
    """One model, one loss, AdamW: the job skeleton SFT, DPO and the reward model share.

        loss, metrics = loss_fn(data_rng);  zero_grad;  backward;  clip;  opt.step;  sched.step

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
        self.start = restore_training(run, ckpt, model, self.opt, self.sched, self.data_rng) if ckpt else 0

    def save(self, step: int) -> Path:
        state = training_state(step, self.opt, self.sched, self.data_rng)
        return self.run.save(step, self.model, self.meta, state, keep=self.cfg.keep_checkpoints)

    def step(self, step: int, loss_fn: Callable[[random.Random], tuple[torch.Tensor, dict]]) -> dict:
        """One optimizer step; its metrics only every `log_every` steps and at the last (else {})."""
        self.model.train()
        loss, metrics = loss_fn(self.data_rng)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.sched.step()
        if (step + 1) % self.cfg.log_every and step + 1 != self.cfg.steps:
            return {}
        return {**{k: float(v) for k, v in metrics.items()}, "grad/norm": gn.item(), "lr": self.sched.get_last_lr()[0]}

    def fit(self, loss_fn: Callable[[random.Random], tuple[torch.Tensor, dict]], eval_fn: Callable[[], dict],
            eval_every: int, final_fn: Callable[[], dict], progress: bool = True, desc: str = "train",
            show: tuple[str, ...] = ()) -> dict:
        """`train_loop` over the remaining steps, then `final_fn()` (the job's closing metrics, which
        it logs or saves as it needs); closes the run and returns them."""
        train_loop(self.run, self.start, self.cfg.steps, lambda step: self.step(step, loss_fn), eval_fn, self.save,
                   eval_every, self.cfg.ckpt_every, progress, desc=desc, show=show)
        final = final_fn()
        self.run.close()
        return final
