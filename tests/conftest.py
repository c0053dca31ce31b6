"""Shared test fixtures: pinned threads, the char tokenizer, the one tiny-model builder, the override lists
of the tiny jobs, and the test doubles more than one file uses.

Tests import them (`from conftest import TOK, tiny_gpt`); the job builders are also fixtures
(`tiny_job`, `tiny_train_job`), since they need the test's tmp_path.
"""
from __future__ import annotations

import os

import pytest
import torch

from rlpt.config import load_config
from rlpt.envs.calculator import CalculatorArithmeticEnv
from rlpt.framework.environment import ArithmeticEnv, Verdict
from rlpt.gpt_mini.model import GPT, GPTConfig
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.sft import SFTJob

# One thread by default: the test models are tiny (d_model 32), so a second thread buys nothing, and on
# a 2-core box shared with another torch process two threads make each step up to ~50x slower (OpenMP
# workers spin-waiting for a core; measured 75 ms -> 3.7 s for a 4x128 forward+backward).
# RLPT_TEST_THREADS=2 for a quiet machine, e.g. for the slow end-to-end test.
torch.set_num_threads(int(os.environ.get("RLPT_TEST_THREADS", "1")))

TOK = CharTokenizer()

# The unit tests' gpt_mini: GQA 2/1, and 48 positions hold a 3-operand prompt and a short multi-turn response.
TINY_SHAPE = dict(n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64, max_seq_len=48)
# The SFT jobs' (and the short algorithm runs started from one): GQA 4/2 in 32 positions.
SFT_SHAPE = {**TINY_SHAPE, "n_head": 4, "n_kv_head": 2, "max_seq_len": 32}


def tiny_gpt(seed: int = 0, std: float | None = None, norm_std: float | None = None, **shape) -> GPT:
    """A gpt_mini GPT of TINY_SHAPE updated by `shape` (any GPTConfig field; vocab_size defaults to TOK's),
    initialised under torch.manual_seed(seed), in eval mode (gpt_mini has no dropout; the trainer switches it).

    std: every weight but the norms is then redrawn ~ N(0, std²) from a generator seeded with `seed`
    (peaked logits, so a greedy argmax is immune to 1e-7 kernel noise); norm_std: the norm weights too,
    as 1 + N(0, norm_std²) (so a cache path that skipped a norm would show)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY_SHAPE, "vocab_size": TOK.vocab_size, **shape}))
    if std:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                elif norm_std:
                    p.copy_(1 + norm_std * torch.randn(p.shape, generator=g))
    return model.eval()


def model_overrides(shape: dict) -> list[str]:
    """A shape as `model.<key>=<value>` command-line overrides."""
    return [f"model.{k}={v}" for k, v in shape.items()]


# Small enough that a 10-step SFT run takes well under a second, big enough to exercise GQA and RoPE.
TINY_SFT = [*model_overrides(SFT_SHAPE), "sft.batch_size=8", "sft.log_every=1", "eval.size=8", "eval.every=4",
            "eval.pass_k=2", "eval.max_tokens=8", "sft.optim.warmup_steps=2", "run.progress=false"]
TINY = TINY_SFT        # the name the SFT, DPO, pipeline and algorithm-run tests import

# A tiny `rlpt train` job: its SFT start (30 chain-of-thought steps) gives a model whose groups are mixed,
# so the RL steps really train.
TINY_RL = [*model_overrides(TINY_SHAPE), "sft.steps=30", "sft.batch_size=16", "sft.format=cot",
           "sft.ckpt_every=30", "rollout.k=4", "rollout.prompts_per_step=4", "rollout.max_tokens=24", "eval.size=16",
           "eval.every=3", "run.progress=false", "task.max_operands=3", "trainer.optim.lr=1e-3"]


@pytest.fixture
def tiny_job(tmp_path):
    """tiny_job(*overrides) -> an SFTJob whose run folder lives under tmp_path."""
    def make(*overrides: str) -> SFTJob:
        return load_config(SFTJob, None, [*TINY_SFT, f"run.out_dir={tmp_path / 'runs'}", *overrides])
    return make


@pytest.fixture
def tiny_train_job(tmp_path):
    """tiny_train_job(*overrides) -> a TrainJob (TINY_RL) whose run folder lives under tmp_path."""
    from rlpt.train import load_train_job

    def make(*overrides: str):
        return load_train_job(None, [*TINY_RL, f"run.out_dir={tmp_path / 'runs'}", *overrides])
    return make


# -- test doubles ------------------------------------------------------------------------------------------
class ParityEnv(ArithmeticEnv):
    """Reward 1 for an even-length response: a random tiny model gets mixed groups."""

    def verify(self, prompt, response):
        return Verdict(float(len(response) % 2 == 0))


class ConstantEnv(ArithmeticEnv):
    """Reward 1 whatever the response: every group degenerate."""

    def verify(self, prompt, response):
        return Verdict(1.0)


class ReplyOnceEnv(CalculatorArithmeticEnv):
    """The first turn gets a tool reply (`=12#`) whatever it says; the second is scored by its length's
    parity (mixed rewards) and ends the episode."""

    def step(self, text, state):
        state["n"] = state.get("n", 0) + 1
        if state["n"] == 1:
            return "=12#", 0.0, False, {}
        return "", float(len(text) % 2 == 0), True, {}


@pytest.fixture(scope="session")
def recipe_sft(tmp_path_factory):
    """The GRPO recipe's SFT start (its sft: section: CoT, 180 steps, deliberately imperfect), trained once per
    session for the slow tests that start from it (test_compare's six algorithms, test_grpo_e2e)."""
    from rlpt.train import load_train_job, sft_init
    out = tmp_path_factory.mktemp("recipe_sft")
    job = load_train_job("recipes/grpo_arith.yaml", [f"run.out_dir={out}", "run.name=start", "run.progress=false"])
    return out, sft_init(job, resume=False)


# -- a Hugging Face policy for the model.hf_path tests (test_hf_train, test_hf_ppo, test_hf_ray) ------------------
HF_FAST = [o for o in TINY_RL if not o.startswith(("model.", "sft."))] + ["eval.every=100", "eval.size=8"]


def export_tiny_sft(root):
    """A tiny gpt_mini after TINY_RL's 30 CoT SFT steps (mixed groups: GRPO steps train), exported with
    `rlpt export` into root/hf -> that directory."""
    from rlpt.models.export import export_checkpoint
    from rlpt.sft import train_sft
    from rlpt.train import load_train_job
    sft = load_train_job(None, [*TINY_RL, f"run.out_dir={root}", "run.name=start"])
    job = SFTJob(run=sft.run.model_copy(update={"name": "sft"}), model=sft.model.gpt_mini(), task=sft.task,
                 sft=sft.sft, eval=sft.eval.model_copy(update={"pass_k": 1, "size": 8}))
    train_sft(job)
    export_checkpoint(root / "sft", root / "hf")
    return root / "hf"


def hf_job(tmp_path, hf_dir, *overrides):
    """`rlpt train model.hf_path=hf_dir` on HF_FAST's settings, its runs under tmp_path/runs."""
    from rlpt.train import load_train_job
    return load_train_job(None, [*HF_FAST, f"run.out_dir={tmp_path / 'runs'}", f"model.hf_path={hf_dir}", *overrides])
