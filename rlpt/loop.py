"""The outer loop every job shares: steps, periodic eval, atomic checkpoints, Ctrl-C, progress bar.

    for step in range(start, total):  metrics = step_fn(step);  [eval];  log;  [checkpoint]

First Ctrl-C finishes the current step, saves a checkpoint at that step boundary and raises
`StopRequested`; the run then continues bit-identically with `--resume`.
"""
from __future__ import annotations

import time
from typing import Callable

from tqdm import tqdm

from rlpt.run import GracefulInterrupt, Run, StopRequested


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
