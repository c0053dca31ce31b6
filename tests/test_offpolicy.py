"""Off-policy corrections and staleness (issue 15, in-process) and the skipped reference forward (issue 14):
by-hand fixtures for each mode, an exact-enumeration toy for TIS, mode none bit-identical to the plain loss,
staleness in optimizer steps, and β = 0 doing no π_ref forward."""
import copy
import math

import pytest
import torch

import rlpt.algorithms  # noqa: F401 - registers the algorithms make_algorithm builds
from rlpt.algorithms.grpo import GRPO
from rlpt.checkpoint import save_checkpoint
from rlpt.framework.algorithm import AlgorithmConfigError, clipped_surrogate, make_algorithm
from rlpt.framework.controller import Controller
from rlpt.framework.environment import ArithmeticEnv, Verdict
from rlpt.framework.offpolicy import behaviour_weights, ess
from rlpt.framework.reference import Reference
from rlpt.framework.rollout import Rollout
from rlpt.framework.trainer import Trainer
from rlpt.framework.trajectory import Trajectory, collate, per_token_logp
from rlpt.framework.weight_sync import WeightSyncer
from rlpt.gpt_mini.generate import SamplingParams
from rlpt.gpt_mini.task import ArithmeticTask
from rlpt.train import build, load_train_job

from conftest import SFT_SHAPE, TINY_SFT, TOK, tiny_gpt

RHO = [0.25, 0.5, 1.0, 1.5, 3.0, 6.0]


def weights(mode, rho_rows, lens, **kw):
    """Rows of ratios ρ (padded with 1 to the longest), μ = 1 (log μ = 0), π_prox = ρ; mask from lens."""
    T = max(len(r) for r in rho_rows)
    rho = torch.tensor([r + [1.0] * (T - len(r)) for r in rho_rows])
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lens])
    return behaviour_weights(rho.log(), torch.zeros_like(rho), mask, mode, **kw)


# -- by-hand fixtures ------------------------------------------------------------------------------------
def test_tis_is_min_rho_c_and_counts_the_clamped():
    w, keep, m = weights("tis", [RHO], [6])
    assert w[0].tolist() == pytest.approx([0.25, 0.5, 1.0, 1.5, 2.0, 2.0], abs=1e-6)
    assert keep.tolist() == [[1.0] * 6] and m["offpolicy/clamped_frac"] == pytest.approx(2 / 6)
    assert m["offpolicy/masked_frac"] == 0.0
    w, _, m = weights("tis", [RHO], [6], cap=5.0)
    assert w[0, -1].item() == pytest.approx(5.0) and m["offpolicy/clamped_frac"] == pytest.approx(1 / 6)
    assert not w.requires_grad


def test_icepop_zeroes_ratios_outside_low_high():
    w, keep, m = weights("icepop", [RHO], [6])
    assert w[0].tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5, 3.0, 0.0], abs=1e-6)   # 0.5 and 5 are kept
    assert keep[0].tolist() == [0, 1, 1, 1, 1, 0]
    assert m["offpolicy/masked_frac"] == pytest.approx(2 / 6) and m["offpolicy/clamped_frac"] == 0.0
    w, _, _ = weights("icepop", [[0.2, 0.5, 5.0, 5.5]], [4], low=0.2, high=5.5)   # prime-rl's α = 0.2
    assert w[0].tolist() == pytest.approx([0.2, 0.5, 5.0, 5.5], abs=1e-6)


def test_seq_mask_tis_keeps_or_drops_whole_sequences_by_the_geometric_mean():
    rows = [RHO,                  # ρ̄ = 3.375^(1/6) = 1.22: kept, tokens TIS-clamped
            [0.1, 10.0],          # ρ̄ = 1: kept although both tokens are outside [0.5, 5] (icepop drops both)
            [0.1, 0.2],           # ρ̄ = 0.141: dropped
            [8.0, 8.0],           # ρ̄ = 8: dropped although TIS alone would keep min(8, 2) = 2
            [0.2, 9.0, 0.3]]      # the third token is padding: ρ̄ over (0.2, 9) = 1.34 kept
    w, keep, m = weights("seq_mask_tis", rows, [6, 2, 2, 2, 2])
    assert w[0].tolist() == pytest.approx([0.25, 0.5, 1.0, 1.5, 2.0, 2.0], abs=1e-6)
    assert w[1, :2].tolist() == pytest.approx([0.1, 2.0], abs=1e-6)
    assert w[2, :2].tolist() == [0.0, 0.0] and w[3, :2].tolist() == [0.0, 0.0]
    assert w[4, :3].tolist() == pytest.approx([0.2, 2.0, 1.0], abs=1e-6)        # padding weighs 1
    assert keep[:, :2].sum(-1).tolist() == [2, 2, 0, 0, 2]
    assert m["offpolicy/masked_frac"] == pytest.approx(4 / 14)
    assert m["offpolicy/clamped_frac"] == pytest.approx(4 / 14)                   # 3, 6, 10 and 9 cut to 2
    icepop, _, _ = weights("icepop", rows, [6, 2, 2, 2, 2])
    assert icepop[1, :2].tolist() == [0.0, 0.0]


def test_decoupled_weight_is_rho_masked_above_high():
    w, keep, m = weights("decoupled", [RHO], [6])
    assert w[0].tolist() == pytest.approx([0.25, 0.5, 1.0, 1.5, 3.0, 0.0], abs=1e-6)   # no clamp, no lower cut
    assert m["offpolicy/masked_frac"] == pytest.approx(1 / 6)


def test_decoupled_loss_is_behaviour_weight_times_ppo_on_u():
    """GRPO with mode=decoupled: −(π_prox/μ)·min(u·A, clip(u, 0.8, 1.2)·A), u = π_θ/π_prox, token-mean."""
    t0 = Trajectory([1], [2, 3, 4], torch.ones(3), torch.tensor([-1.0, -0.5, -2.0]), advantage=1.0,
                    extra={"prox_logp": torch.tensor([-0.8, -0.5, -2.3])})
    t1 = Trajectory([1], [2, 5], torch.ones(2), torch.tensor([-0.3, -1.2]), advantage=-0.5,
                    extra={"prox_logp": torch.tensor([-0.4, -1.0])})
    b = collate([t0, t1], pad_id=0)
    algo = make_algorithm({"name": "grpo", "beta": 0.0, "loss_agg": "token-mean", "offpolicy": {"mode": "decoupled"}},
                          4, 8)
    new = torch.tensor([[-0.7, -0.6, -2.2], [-0.5, -0.9, 0]])   # π_θ at the response columns
    loss, m = algo.compute_loss(b, new)
    expect = 0.0
    for (old, prox, theta, a) in [(-1.0, -0.8, -0.7, 1.0), (-0.5, -0.5, -0.6, 1.0), (-2.0, -2.3, -2.2, 1.0),
                                  (-0.3, -0.4, -0.5, -0.5), (-1.2, -1.0, -0.9, -0.5)]:
        rho, u = math.exp(prox - old), math.exp(theta - prox)
        expect += -rho * min(u * a, min(max(u, 0.8), 1.2) * a)
    assert loss.item() == pytest.approx(expect / 5, abs=1e-6)
    assert "kl/mean" not in m and m["offpolicy/masked_frac"] == 0.0


def test_all_padding_gives_weight_one_never_nan():
    for mode in ("none", "tis", "icepop", "seq_mask_tis", "decoupled"):
        prox = torch.tensor([[-50.0, 3.0, -1.0], [-1.0, -2.0, 0.0]])
        mask = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
        w, keep, m = behaviour_weights(prox, torch.zeros(2, 3), mask, mode)
        assert w[0].tolist() == [1.0, 1.0, 1.0] and keep[0].tolist() == [0.0, 0.0, 0.0], mode
        assert torch.isfinite(w).all() and all(math.isfinite(v) for v in m.values()), mode
        w, _, m = behaviour_weights(prox, torch.zeros(2, 3), torch.zeros(2, 3), mode)
        assert torch.equal(w, torch.ones(2, 3)) and m["offpolicy/ess"] == 1.0 and m["offpolicy/kl_k3"] == 0.0


def test_ess_and_kl_k3_by_hand():
    assert ess(torch.full((7,), 0.3), torch.ones(7)) == pytest.approx(7.0)
    assert ess(torch.tensor([2.0, 0.0, 0.0, 5.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])) == pytest.approx(1.0)
    assert ess(torch.tensor([1.0, 3.0]), torch.ones(2)) == pytest.approx(16 / 10)
    assert ess(torch.zeros(3), torch.ones(3)) == 0.0
    _, _, m = weights("tis", [RHO], [6])
    w = [min(r, 2.0) for r in RHO]
    assert m["offpolicy/ess"] == pytest.approx(sum(w) ** 2 / (6 * sum(x * x for x in w)), abs=1e-6)
    assert m["offpolicy/kl_k3"] == pytest.approx(sum(r - 1 - math.log(r) for r in RHO) / 6, abs=1e-6)
    assert m["offpolicy/abs_log_rho_max"] == pytest.approx(math.log(6.0), abs=1e-6)
    _, _, m = weights("tis", [[1.0, 1.0]], [2])
    assert m["offpolicy/kl_k3"] == 0.0 and m["offpolicy/ess"] == 1.0


def test_bad_mode_and_bad_bounds_name_the_key():
    with pytest.raises(ValueError, match="algorithm.offpolicy.mode"):
        behaviour_weights(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "is")
    with pytest.raises(AlgorithmConfigError, match="algorithm.offpolicy.mode"):
        make_algorithm({"name": "grpo", "offpolicy": {"mode": "tiss"}}, 4, 8)
    with pytest.raises(AlgorithmConfigError, match="algorithm.offpolicy.low"):
        make_algorithm({"name": "ppo", "offpolicy": {"low": 2.0}}, 4, 8)
    with pytest.raises(AlgorithmConfigError, match="algorithm.offpolicy.capp"):
        make_algorithm({"name": "grpo", "offpolicy": {"capp": 2.0}}, 4, 8)
    algo = make_algorithm({"name": "grpo", "offpolicy": {"mode": "tis"}}, 4, 8)
    b = collate([Trajectory([1], [2], torch.ones(1), torch.zeros(1))], pad_id=0)
    with pytest.raises(ValueError, match="prox_logp"):
        algo.compute_loss(b, torch.zeros(1, 1))


# -- exact enumeration: TIS over a categorical policy of 5 actions -------------------------------------------
ADV = [1.0, -0.5, 2.0, 0.0, -1.5]   # advantage of each action


def toy_gradients(theta, mu, cap):
    """The on-policy gradient ∇Σ_a π(a)A(a), the TIS estimate's exact expectation over a ∼ μ,
    Σ_a μ(a)·min(π(a)/μ(a), C)·A(a)·∇log π(a) (through clipped_surrogate at θ = θ_prox, so u = 1), the
    unweighted one Σ_a μ(a)·A(a)·∇log π(a), and ρ = π/μ."""
    A = torch.tensor(ADV, dtype=theta.dtype)
    th = theta.clone().requires_grad_(True)
    true, = torch.autograd.grad((torch.softmax(th, 0) * A).sum(), th)
    th = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(th, 0)[None]                     # one "sequence" of 5 tokens, one per action
    prox, behav, mask = logp.detach(), mu.log()[None], torch.ones(1, 5, dtype=theta.dtype)
    w, _, _ = behaviour_weights(prox, behav, mask, "tis", cap=cap)
    pg_tok, _ = clipped_surrogate(logp, prox, A[None], mask, 0.2, 0.2, weight=w)
    tis, = torch.autograd.grad(-(mu[None] * pg_tok).sum(), th)   # expectation over a ∼ μ, by enumeration
    th = theta.clone().requires_grad_(True)
    naive, = torch.autograd.grad((mu * A * torch.log_softmax(th, 0)).sum(), th)
    return true, tis, naive, (prox.exp() / mu[None])[0]


def test_tis_gradient_equals_the_on_policy_gradient_when_every_ratio_is_under_c():
    theta = torch.tensor([0.3, -0.2, 0.5, 0.0, -0.4], dtype=torch.float64)
    mu = torch.softmax(theta + torch.tensor([0.2, -0.3, 0.1, 0.4, -0.1], dtype=torch.float64), 0)
    true, tis, naive, rho = toy_gradients(theta, mu, cap=2.0)
    assert rho.max() < 2.0 and rho.min() < 1.0 < rho.max()       # off-policy, every ratio under C
    assert torch.allclose(tis, true, atol=1e-12, rtol=0)
    assert (naive - true).abs().max() > 1e-2                      # μ's samples taken as π's: wrong


def test_tis_gradient_is_biased_but_bounded_when_some_ratio_exceeds_c():
    theta = torch.tensor([2.0, -1.0, 0.5, 0.0, -0.4], dtype=torch.float64)
    mu = torch.softmax(torch.tensor([-1.0, 0.5, 0.5, 0.0, -0.4], dtype=torch.float64), 0)   # ρ_0 ≫ C
    true, tis, _, rho = toy_gradients(theta, mu, cap=2.0)
    assert rho[0] > 2.0 and (rho[1:] < 2.0).all()
    assert (tis - true).abs().max() > 1e-2                        # biased
    # the bias is exactly the truncated mass: Σ_{ρ>C} (π − C·μ)·A·∇log π
    pi, A = torch.softmax(theta, 0), torch.tensor(ADV, dtype=torch.float64)
    grad_logp = torch.eye(5, dtype=torch.float64) - pi[None]       # ∇_θ log π(a) = e_a − π (row a)
    over = (rho > 2.0).double()
    bias = ((over * (pi - 2.0 * mu) * A)[:, None] * grad_logp).sum(0)
    assert torch.allclose(true - tis, bias, atol=1e-12, rtol=0)
    # bounded: by the probability mass above the cap times max |A| times max ‖∇log π‖
    bound = float((over * (pi - 2.0 * mu)).sum()) * float(A.abs().max()) * float(grad_logp.norm(dim=1).max())
    assert float((true - tis).norm()) <= bound


# -- mode none: the plain loss, bit for bit ------------------------------------------------------------------
def grpo_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for i in range(4):
        R = 3 + i
        trajs.append(Trajectory([1, 2], list(range(3, 3 + R)), torch.ones(R), -torch.rand(R, generator=g),
                                ref_logp=-torch.rand(R, generator=g), advantage=float(i) - 1.5))
    return collate(trajs, pad_id=0)


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_mode_none_is_the_unweighted_clipped_surrogate_bit_for_bit(beta):
    batch = grpo_batch()
    model = tiny_gpt()
    algo = make_algorithm({"name": "grpo", "beta": beta}, 4, 8)
    assert algo.cfg.offpolicy.mode == "none" and not algo.uses_prox

    def loss_and_grad(fn):
        model.zero_grad(set_to_none=True)
        new = per_token_logp(model, batch.input_ids)
        loss = fn(new)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    def by_hand(new):
        pg_tok, _ = clipped_surrogate(new, batch.old_logp, batch.advantage, batch.mask, 0.2, 0.2)
        kl, _ = algo.kl_term(batch, new)
        return algo.aggregate(pg_tok, batch) + kl
    got, want = loss_and_grad(lambda new: algo.compute_loss(batch, new)[0]), loss_and_grad(by_hand)
    assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    # tis with π_prox = μ: every ρ = 1, w = 1 — the same loss and gradient again
    batch.extra["prox_logp"] = batch.old_logp.clone()
    tis = make_algorithm({"name": "grpo", "beta": beta, "offpolicy": {"mode": "tis"}}, 4, 8)
    again = loss_and_grad(lambda new: tis.compute_loss(batch, new)[0])
    assert torch.equal(again[0], want[0]) and all(torch.equal(a, b) for a, b in zip(again[1], want[1]))


@pytest.mark.parametrize("name", ["ppo", "reinforce", "rloo", "dapo", "drgrpo"])
def test_every_algorithm_applies_the_weight(name):
    """A token the correction drops (icepop, ρ = e² > 5) must not move the loss, in every algorithm."""
    batch = grpo_batch()
    batch.extra["prox_logp"] = batch.old_logp.clone()
    batch.extra["values"] = torch.zeros_like(batch.old_logp)
    batch.extra["returns"] = torch.zeros_like(batch.old_logp)
    new = batch.old_logp.clone() - 0.1 * batch.mask
    kw = {"values": torch.zeros_like(new)} if name == "ppo" else {}
    algo = make_algorithm({"name": name, "beta": 0.0, "offpolicy": {"mode": "icepop"}}, 4, 8)
    base, m = algo.compute_loss(batch, new, **kw)
    assert m["offpolicy/masked_frac"] == 0.0
    dropped = copy.deepcopy(batch)
    row, col = 2, int(batch.mask[2].nonzero()[0])
    dropped.extra["prox_logp"][row, col] += 2.0                   # ρ = e² = 7.4 > 5: masked
    dropped.advantage[row, col] = 0.0                             # ... so it weighs as a zero-advantage token
    zero_adv = copy.deepcopy(batch)
    zero_adv.advantage[row, col] = 0.0
    loss_dropped, m = algo.compute_loss(dropped, new, **kw)
    assert m["offpolicy/masked_frac"] > 0
    assert loss_dropped.item() == pytest.approx(algo.compute_loss(zero_adv, new, **kw)[0].item(), abs=1e-7)
    assert loss_dropped.item() != pytest.approx(base.item(), abs=1e-7)


# -- staleness in optimizer steps ---------------------------------------------------------------------------
class CoinEnv(ArithmeticEnv):
    """Reward 1 when the response's character codes add up to an even number: about half the samples of a
    random tiny model, so a group of 4 is all-equal 1 time in 8 and a step of 4 groups is never skipped."""

    def verify(self, prompt, response):
        return Verdict(float(sum(map(ord, response)) % 2 == 0))


def controller(sync_every=1, mini_batches=2, epochs=1, beta=0.05, mode="none", prompts=4, k=4):
    policy = tiny_gpt()
    env = CoinEnv(ArithmeticTask(max_operands=3), seed=0, tokenizer=TOK)
    rollout = Rollout(copy.deepcopy(policy), TOK, prompts, SamplingParams(max_tokens=6, temperature=1.0))
    algo = make_algorithm({"name": "grpo", "beta": beta, "offpolicy": {"mode": mode}}, k, 6)
    scorers = {"prox_logp": Reference.prox_scorer(policy, 1.0)} if algo.uses_prox else {}
    ref = Reference(policy, temperature=1.0, scorers=scorers, ref_logp=algo.uses_reference)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    trainer = Trainer(policy, opt, None, 1.0, 0, mini_batches, epochs, temperature=1.0)
    return Controller(rollout, env, ref, algo, trainer, WeightSyncer(sync_every), k, TOK.pad_id)


@pytest.mark.parametrize("sync_every,mini_batches,epochs,means,maxes", [
    (1, 2, 1, [0.5] * 4, [1.0] * 4),                     # 0 and 1 every step
    (2, 2, 1, [0.5, 2.5, 0.5, 2.5], [1.0, 3.0, 1.0, 3.0]),   # an unsynced step trains 2 optimizer steps late
    (1, 2, 2, [1.5] * 4, [3.0] * 4),                     # 0 1 2 3: epochs compound it too
    (3, 1, 1, [0.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 0.0])])
def test_staleness_counts_optimizer_steps(sync_every, mini_batches, epochs, means, maxes):
    ctl = controller(sync_every, mini_batches, epochs)
    got, versions = [], []
    for _ in range(4):
        m = ctl.step()
        assert m["step/skipped"] == 0
        got.append((m["staleness/mean"], m["staleness/max"]))
        versions.append(ctl.rollout.version)
    assert got == list(zip(means, maxes))
    assert ctl.trainer.version == 4 and versions == [s - s % sync_every for s in range(1, 5)]
    groups = ctl.rollout.generate(ctl.env, 4)
    assert all(t.version == ctl.rollout.version for g in groups for t in g)


def test_offpolicy_run_logs_its_diagnostics_and_fresh_weights_give_rho_one():
    ctl = controller(sync_every=2, mode="tis")
    m1, m2 = ctl.step(), ctl.step()
    for m in (m1, m2):
        for key in ("offpolicy/kl_k3", "offpolicy/ess", "offpolicy/clamped_frac", "offpolicy/masked_frac"):
            assert math.isfinite(m[key]), key
    assert m1["offpolicy/abs_log_rho_max"] < 1e-5 and m1["offpolicy/ess"] == pytest.approx(1.0, abs=1e-6)
    assert m2["offpolicy/abs_log_rho_max"] > 1e-3 and m2["offpolicy/kl_k3"] > 0   # step 2 sampled stale weights


# -- issue 14: no reference forward when nothing reads it ----------------------------------------------------
@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    model = tiny_gpt(**SFT_SHAPE)
    return save_checkpoint(tmp_path_factory.mktemp("init") / "init", model, model.cfg.to_dict(), {"step": 0})


def built(init, tmp_path, *overrides):
    job = load_train_job(None, [*TINY_SFT, f"init_from={init}", f"run.out_dir={tmp_path}", "rollout.k=4",
                                "rollout.prompts_per_step=4", "rollout.max_tokens=8", *overrides])
    ctl, _ = build(job, init)
    ctl.env = CoinEnv(ArithmeticTask(max_operands=3), seed=0, tokenizer=TOK)
    calls = []
    ctl.reference.model.register_forward_hook(lambda *a: calls.append(1))
    return ctl, calls


def test_beta_zero_skips_the_reference_forward_and_trains_bit_identically(init_ckpt, tmp_path, monkeypatch):
    ctl, calls = built(init_ckpt, tmp_path, "algorithm.beta=0")
    m = ctl.step()
    assert m["step/skipped"] == 0 and calls == [] and not ctl.algorithm.uses_reference
    assert "kl/mean" not in m and m["loss/kl"] == 0.0
    skipped = [p.detach().clone() for p in ctl.trainer.model.parameters()]

    monkeypatch.setattr(GRPO, "uses_reference", property(lambda self: True))   # the old path: forward, β·KL = 0
    ctl, calls = built(init_ckpt, tmp_path, "algorithm.beta=0")
    m = ctl.step()
    assert calls and "kl/mean" in m
    assert all(torch.equal(a, b) for a, b in zip(skipped, ctl.trainer.model.parameters()))


def test_beta_positive_runs_the_reference_and_offpolicy_adds_the_prox_scorer(init_ckpt, tmp_path):
    ctl, calls = built(init_ckpt, tmp_path, "algorithm.beta=0.05")
    m = ctl.step()
    assert len(calls) == 1 and "kl/mean" in m and "prox_logp" not in ctl.reference.scorers
    assert "offpolicy/ess" not in m
    ctl, calls = built(init_ckpt, tmp_path, "algorithm.beta=0", "algorithm.offpolicy.mode=seq_mask_tis")
    m = ctl.step()
    assert calls == [] and "prox_logp" in ctl.reference.scorers
    assert m["offpolicy/masked_frac"] == 0.0 and m["offpolicy/abs_log_rho_max"] < 1e-5   # fresh: ρ = 1
    assert ctl.trainer.model.training   # the scorer's eval() was undone
