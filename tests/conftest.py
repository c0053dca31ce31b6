"""Shared fixtures: pinned threads and a tiny SFT job in a tmp run folder."""
from __future__ import annotations

import os

import pytest
import torch

from rlpt.config import SFTJob, load_config

# One thread by default: the test models are tiny (d_model 32), so a second thread buys nothing, and on
# a 2-core box shared with another torch process two threads make each step up to ~50x slower (OpenMP
# workers spin-waiting for a core; measured 75 ms -> 3.7 s for a 4x128 forward+backward).
# RLPT_TEST_THREADS=2 for a quiet machine, e.g. for the slow end-to-end test.
torch.set_num_threads(int(os.environ.get("RLPT_TEST_THREADS", "1")))

# Small enough that a 10-step run takes well under a second, big enough to exercise GQA and RoPE.
TINY = ["model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.d_model=32", "model.d_ff=64",
        "model.max_seq_len=32", "sft.batch_size=8", "sft.log_every=1", "eval.size=8", "eval.every=4",
        "eval.pass_k=2", "eval.max_tokens=8", "sft.optim.warmup_steps=2", "run.progress=false"]


@pytest.fixture
def tiny_job(tmp_path):
    """tiny_job(*overrides) -> an SFTJob whose run folder lives under tmp_path."""
    def make(*overrides: str) -> SFTJob:
        return load_config(SFTJob, None, [*TINY, f"run.out_dir={tmp_path / 'runs'}", *overrides])
    return make
