"""sync.lag (rlpt.framework.lagged_sync): the rollout samples with the weights of exactly `lag` train steps ago,
so the trainer's staleness is min(t, lag) train steps on step t, every step; the weights handed over are
bit-equal to the trainer's `lag` steps before; state_dict resumes it; the config refuses what it cannot do."""
import copy

import pytest
import torch

import rlpt.algorithms  # noqa: F401 - registers the algorithms make_algorithm builds
from rlpt.framework.algorithm import make_algorithm
from rlpt.framework.controller import Controller
from rlpt.framework.environment import ArithmeticEnv, Verdict
from rlpt.framework.lagged_sync import LaggedSyncer
from rlpt.framework.reference import Reference
from rlpt.framework.rollout import Rollout
from rlpt.framework.trainer import Trainer
from rlpt.framework.weight_sync import WeightSyncer
from rlpt.gpt_mini.generate import SamplingParams
from rlpt.gpt_mini.task import ArithmeticTask
from rlpt.train import build, load_train_job

from conftest import SFT_SHAPE, TINY_SFT, TOK, tiny_gpt


class CoinEnv(ArithmeticEnv):
    """Reward 1 when the response's character codes add up to an even number: mixed groups, no skipped step."""

    def verify(self, prompt, response):
        return Verdict(float(sum(map(ord, response)) % 2 == 0))


def controller(lag: int, mini_batches: int, mode: str = "none", k: int = 4) -> Controller:
    policy = tiny_gpt()
    env = CoinEnv(ArithmeticTask(max_operands=3), seed=0, tokenizer=TOK)
    rollout = Rollout(copy.deepcopy(policy), TOK, 4, SamplingParams(max_tokens=6, temperature=1.0))
    algo = make_algorithm({"name": "grpo", "beta": 0.0, "offpolicy": {"mode": mode}}, k, 6)
    scorers = {"prox_logp": Reference.prox_scorer(policy, 1.0)} if algo.uses_prox else {}
    ref = Reference(policy, temperature=1.0, scorers=scorers, ref_logp=False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    trainer = Trainer(policy, opt, None, 1.0, 0, mini_batches, 1, temperature=1.0)
    return Controller(rollout, env, ref, algo, trainer, LaggedSyncer(lag), k, TOK.pad_id)


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("lag,mini_batches", [(3, 1), (2, 2)])
def test_every_step_trains_on_weights_exactly_lag_steps_old(lag, mini_batches):
    ctl = controller(lag, mini_batches, mode="tis" if lag == 3 else "none")
    trained = [params(ctl.trainer.model)]          # trained[v] = the trainer's weights at version v
    for t in range(7):
        assert all(torch.equal(a, b) for a, b in zip(params(ctl.rollout.model), trained[max(t - lag, 0)]))
        m = ctl.step()
        assert m["step/skipped"] == 0
        behind = min(t, lag)                       # train steps between sampling and training
        # in optimizer steps: behind × mini_batches + j, j = 0 … mini_batches − 1
        assert m["staleness/max"] == behind * mini_batches + mini_batches - 1
        assert m["staleness/mean"] == behind * mini_batches + (mini_batches - 1) / 2
        trained.append(params(ctl.trainer.model))
        assert ctl.trainer.version == t + 1 and ctl.rollout.version == max(t + 1 - lag, 0)
        assert m["sync/done"] == float(t + 1 > lag)
    if lag == 3:   # the correction sees a real mismatch once the lag bites (ρ ≠ 1)
        assert m["offpolicy/abs_log_rho_max"] > 1e-3 and m["offpolicy/kl_k3"] > 0
    assert ctl.syncer.syncs == 7 - lag and len(ctl.syncer.history) == lag


class Holder(torch.nn.Module):
    """A trainer or rollout stand-in: one parameter and a version."""

    def __init__(self, value: float):
        super().__init__()
        self.model = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.model.weight.fill_(value)
        self.version = 0


def test_state_dict_resumes_the_same_lagged_weights():
    trainer, rollout = Holder(0.0), Holder(0.0)
    syncer = LaggedSyncer(2)
    got = []
    for v in range(1, 6):
        trainer.version = v
        with torch.no_grad():
            trainer.model.weight.fill_(float(v))
        syncer.sync(trainer, rollout)
        got.append((rollout.version, rollout.model.weight.item()))
        if v == 3:
            saved = copy.deepcopy(syncer.state_dict())
    assert got == [(0, 0.0), (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]   # version v − 2 from v = 3 on

    resumed, rollout2 = LaggedSyncer(2), Holder(1.0)
    resumed.load_state_dict(saved)
    for v in (4, 5):
        trainer.version = v
        with torch.no_grad():
            trainer.model.weight.fill_(float(v))
        resumed.sync(trainer, rollout2)
    assert (rollout2.version, rollout2.model.weight.item()) == got[-1]
    assert resumed.state_dict()["steps"] == syncer.steps == 5
    with pytest.raises(ValueError, match="sync.lag=2.*sync.lag=3"):
        LaggedSyncer(3).load_state_dict(saved)
    with pytest.raises(ValueError, match="sync.lag must be >= 1"):
        LaggedSyncer(0)


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    from rlpt.checkpoint import save_checkpoint
    model = tiny_gpt(**SFT_SHAPE)
    return save_checkpoint(tmp_path_factory.mktemp("init") / "init", model, model.cfg.to_dict(), {"step": 0})


def job(init, tmp_path, *overrides):
    return load_train_job(None, [*TINY_SFT, f"init_from={init}", f"run.out_dir={tmp_path}", "rollout.k=4",
                                 "rollout.prompts_per_step=4", "rollout.max_tokens=8", *overrides])


def test_the_config_key_builds_the_lagged_syncer_and_refuses_what_it_cannot_do(init_ckpt, tmp_path):
    ctl, _ = build(job(init_ckpt, tmp_path, "sync.lag=4"), init_ckpt)
    assert isinstance(ctl.syncer, LaggedSyncer) and ctl.syncer.lag == 4
    ctl, _ = build(job(init_ckpt, tmp_path), init_ckpt)
    assert isinstance(ctl.syncer, WeightSyncer)
    with pytest.raises(ValueError, match="sync.lag=4 with sync.every=2"):
        job(init_ckpt, tmp_path, "sync.lag=4", "sync.every=2")
    with pytest.raises(ValueError, match="sync.lag=2 is the in-process.*system.max_staleness"):
        job(init_ckpt, tmp_path, "sync.lag=2", "system.topology=async")
    with pytest.raises(ValueError, match="sync.lag"):
        job(init_ckpt, tmp_path, "sync.lag=-1")
