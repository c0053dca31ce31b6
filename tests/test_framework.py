"""The six roles against the acceptance tests lessons 01–08 imply: fixtures with hand-computed numbers,
exact equivalences."""
import ast
import copy
import math
from pathlib import Path

import pytest
import torch

import rlpt.algorithms  # noqa: F401 - registers the algorithms make_algorithm builds
from rlpt.framework.algorithm import AlgorithmConfigError, aggregate, kl_estimate, make_algorithm
from rlpt.framework.controller import Controller
from rlpt.framework.environment import ArithmeticEnv, Prompt, safe_verify
from rlpt.framework.reference import Reference
from rlpt.framework.rollout import Rollout
from rlpt.framework.trainer import Trainer
from rlpt.framework.trajectory import Trajectory, collate, per_token_logp
from rlpt.framework.weight_sync import WeightSyncer
from rlpt.gpt_mini.generate import SamplingParams, processed_logp
from rlpt.gpt_mini.task import ArithmeticTask

from conftest import TOK, ConstantEnv, ParityEnv, tiny_gpt


def traj(prompt, response, mask=None, old=None, reward=0.0, adv=0.0):
    R = len(response)
    return Trajectory(prompt, response, torch.tensor(mask if mask else [1.0] * R),
                      torch.tensor(old if old else [0.0] * R), reward=reward, advantage=adv)


def grpo(**kw):
    return make_algorithm({"name": "grpo", **kw}, group_size=4, max_tokens=8)


def roles(sync_every=1, epochs=1, mini_batches=1, lr=1e-2, temperature=1.0, k=4, prompts=3):
    policy = tiny_gpt()
    env = ParityEnv(ArithmeticTask(max_operands=3), seed=0, tokenizer=TOK)
    rollout = Rollout(copy.deepcopy(policy), TOK, prompts, SamplingParams(max_tokens=6, temperature=temperature))
    ref = Reference(policy, temperature=temperature)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    trainer = Trainer(policy, opt, None, 1.0, 0, mini_batches, epochs, temperature=temperature)
    algo = make_algorithm({"name": "grpo", "loss_agg": "token-mean"}, k, 6)
    return Controller(rollout, env, ref, algo, trainer, WeightSyncer(sync_every), k, TOK.pad_id)


# -- collate: the off-by-one ---------------------------------------------------------------------
def test_collate_aligns_response_tokens_to_logp_columns():
    t0 = traj([5, 6, 7], [8, 9], mask=[1, 1], old=[-0.5, -0.25], adv=2.0)
    t1 = traj([5], [8, 9, 10], mask=[1, 0, 1], old=[-1.0, -2.0, -3.0], adv=-1.0)
    t0.ref_logp, t1.ref_logp = torch.tensor([-0.1, -0.2]), torch.tensor([-0.3, -0.4, -0.5])
    b = collate([t0, t1], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 0]]
    # column j scores token j+1: t0's response starts at position 3 -> column 2
    assert b.mask.tolist() == [[0, 0, 1, 1], [1, 0, 1, 0]]
    assert b.old_logp.tolist() == [[0, 0, -0.5, -0.25], [-1.0, 0, -3.0, 0]]   # masked tokens zeroed
    assert torch.allclose(b.ref_logp, torch.tensor([[0, 0, -0.1, -0.2], [-0.3, 0, -0.5, 0]]))
    assert b.advantage.tolist() == [[0, 0, 2, 2], [-1, 0, -1, 0]]
    assert (b.agg_tokens, b.agg_seqs) == (4.0, 2.0)


def test_per_token_logp_is_next_token_logprob():
    m = tiny_gpt()
    ids = torch.randint(1, TOK.vocab_size, (2, 7))
    lp = per_token_logp(m, ids)
    assert lp.shape == (2, 6)
    full = torch.log_softmax(m(ids), -1)
    assert torch.allclose(lp[1, 3], full[1, 3, ids[1, 4]])


# -- 1 sampling = scoring, 2 ratio at sync --------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_old_logp_is_the_sampling_distribution(temperature):
    ctl = roles(temperature=temperature)
    groups = ctl.rollout.generate(ctl.env, 4)
    trajs = [t for g in groups for t in g]
    b = collate(trajs, TOK.pad_id)
    with torch.no_grad():
        logits = ctl.rollout.model(b.input_ids)[:, :-1]
        lp = processed_logp(logits.reshape(-1, logits.shape[-1]), ctl.rollout.sampling).view(*logits.shape)
        expect = lp.gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
    assert ((expect - b.old_logp).abs() * b.mask).max() < 1e-5
    # the trainer's temperature-aware log-probs agree too, before any update
    assert ((ctl.trainer.logp(b) - b.old_logp).abs() * b.mask).max() < 1e-5


def test_ratio_is_one_right_after_sync():
    ctl = roles(lr=1e-2)
    trained = 0
    for _ in range(10):
        m = ctl.step()
        if m["step/skipped"]:       # all groups degenerate: nothing trained, nothing to check
            continue
        assert m["check/logp_mismatch"] < 1e-5   # first forward of each step saw fresh weights
        trained += 1
    assert trained >= 3
    groups = ctl.rollout.generate(ctl.env, 4)
    b = collate([t for g in groups for t in g], TOK.pad_id)
    assert ((ctl.trainer.logp(b) - b.old_logp).abs() * b.mask).max() < 1e-5


def test_eos_is_trained_and_nothing_after_it():
    ctl = roles()
    for t in [t for g in ctl.rollout.generate(ctl.env, 4) for t in g]:
        assert t.response_mask.sum() == len(t.response_ids)
        if t.finish_reason == "stop":
            assert t.response_ids[-1] == TOK.eos_id and TOK.eos_id not in t.response_ids[:-1]


# -- 3 recompute-bug detector ----------------------------------------------------------------------
def test_clip_fires_with_several_updates_per_batch_and_never_if_old_logp_recomputed():
    ctl = roles(epochs=4, lr=3e-2)
    groups = ctl.rollout.generate(ctl.env, 4)
    ctl.reference.score([t for g in groups for t in g], TOK.pad_id)
    ctl.algorithm.compute_advantages(groups)
    batch = collate([t for g in groups for t in g if not t.degenerate], TOK.pad_id)
    honest = copy.deepcopy(ctl.trainer)
    m = honest.train_step(batch, ctl.algorithm.compute_loss)
    assert m["clip/frac"] > 0 and m["ratio/abs_log_max"] > 0.2

    def recomputing_loss(b, new_logp):   # the bug: old_logp := current weights' log-probs
        b = copy.copy(b)
        b.old_logp = new_logp.detach()
        return ctl.algorithm.compute_loss(b, new_logp)
    buggy = copy.deepcopy(ctl.trainer)
    m = buggy.train_step(batch, recomputing_loss)
    assert m["clip/frac"] == 0 and m["ratio/abs_log_max"] == 0


# -- 4 k3 ------------------------------------------------------------------------------------------
def test_k3_nonnegative_unbiased_and_direction():
    g = torch.Generator().manual_seed(0)
    new, ref = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (kl_estimate(new, ref, "k3") >= 0).all() and (kl_estimate(new, ref, "k2") >= 0).all()
    p = torch.tensor([0.6, 0.3, 0.1])      # π_θ
    q = torch.tensor([0.2, 0.5, 0.3])      # π_ref
    exact = (p * (p / q).log()).sum()      # KL(π_θ ‖ π_ref) = 0.4184
    reverse = (q * (q / p).log()).sum()    # KL(π_ref ‖ π_θ) = 0.4852
    y = torch.multinomial(p, 400_000, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        mc = kl_estimate(p.log()[y], q.log()[y], kind).mean()
        assert abs(mc - exact) < 0.01, kind
    swapped = kl_estimate(q.log()[y], p.log()[y], "k3").mean()
    assert abs(swapped - exact) > 0.1 and abs(swapped - reverse) > 0.05   # swapping estimates neither


# -- 5 advantage fixtures --------------------------------------------------------------------------
def group(rewards):
    return [traj([1], [2], reward=r) for r in rewards]


def test_grpo_advantages_unbiased_std():
    g = group([0, 0, 1])                   # mean 1/3, unbiased std sqrt(1/3)
    grpo().compute_advantages([g])
    s = math.sqrt(1 / 3)
    assert [t.advantage for t in g] == pytest.approx([-1 / 3 / (s + 1e-6)] * 2 + [2 / 3 / (s + 1e-6)], abs=1e-6)
    g2 = group([1, 0])                     # the L05 fixture: ±0.71 = ±1/√2
    grpo().compute_advantages([g2])
    assert [t.advantage for t in g2] == pytest.approx([0.70710, -0.70710], abs=1e-4)


@pytest.mark.parametrize("r", [[1, 1, 1, 1], [0, 0, 0, 0]])
def test_degenerate_group_zero_advantage_flagged(r):
    g = group(r)
    grpo().compute_advantages([g])
    assert all(t.advantage == 0 and t.degenerate for t in g)


def test_group_of_one_is_an_error():
    with pytest.raises(AlgorithmConfigError, match="rollout.k"):
        make_algorithm({"name": "grpo"}, group_size=1, max_tokens=8)
    with pytest.raises(ValueError, match="K >= 2"):
        grpo().compute_advantages([group([1])])


# -- 6 loss fixture (lesson 05 table) ------------------------------------------------------------------
def l05_batch():
    t0 = traj([1], [2, 3, 4, 5], mask=[1, 1, 1, 0], old=[-0.40, -0.10, -1.20, 0], adv=0.71)
    t1 = traj([1], [2, 6, 5, 0], mask=[1, 1, 1, 0], old=[-0.50, -0.90, -0.20, 0], adv=-0.71)
    t0.ref_logp = torch.tensor([-0.30, -0.20, -1.10, 0])
    t1.ref_logp = torch.tensor([-0.30, -0.80, -0.30, 0])
    return collate([t0, t1], pad_id=0)


@pytest.mark.parametrize("shift,pg,k3,frac", [(0.0, 0.0, 0.0077651, 0.0), (0.3, 0.05320, 0.03361, 1.0),
                                              (-0.3, 0.02101, 0.07783, 1.0)])
def test_loss_fixture_lesson05(shift, pg, k3, frac):
    b = l05_batch()
    algo = grpo(loss_agg="token-mean", beta=0.05, clip_eps=0.2)
    new = (b.old_logp + shift) * b.mask
    loss, m = algo.compute_loss(b, new)
    assert float(m["loss/pg"]) == pytest.approx(pg, abs=1e-5)
    assert float(m["kl/mean"]) == pytest.approx(k3, abs=1e-5)
    assert float(m["loss/kl"]) == pytest.approx(0.05 * k3, abs=1e-6)
    assert float(m["clip/frac"]) == pytest.approx(frac)
    assert float(loss) == pytest.approx(pg + 0.05 * k3, abs=1e-5)


def test_aggregation_modes_on_a_fixture():
    b = collate([traj([1], [2, 3], adv=1.0), traj([1], [2, 3, 4, 5], adv=1.0)], pad_id=0)
    x = torch.zeros_like(b.mask)
    x[0, :2], x[1, :4] = 1.0, 2.0        # seq 0: two tokens of 1; seq 1: four tokens of 2
    assert float(aggregate(x, b, "token-mean", 8)) == pytest.approx(10 / 6)
    assert float(aggregate(x, b, "seq-mean-token-mean", 8)) == pytest.approx((1 + 2) / 2)
    assert float(aggregate(x, b, "seq-mean-token-sum-norm", 8)) == pytest.approx(10 / (2 * 8))
    empty = collate([traj([1], [2], mask=[0.0])], pad_id=0)
    assert float(aggregate(torch.ones_like(empty.mask), empty, "token-mean", 8)) == 0.0   # never NaN


# -- 7 reference frozen ------------------------------------------------------------------------------
def test_reference_frozen_and_separate():
    ctl = roles(lr=3e-2)
    ref_before = {k: v.clone() for k, v in ctl.reference.model.state_dict().items()}
    assert all(not p.requires_grad for p in ctl.reference.model.parameters())
    opt_params = {id(p) for g in ctl.trainer.opt.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in ctl.reference.model.parameters()}
    assert not {p.data_ptr() for p in ctl.reference.model.parameters()} & \
        {p.data_ptr() for p in ctl.trainer.model.parameters()}
    for _ in range(3):
        ctl.step()
    assert all(torch.equal(v, ctl.reference.model.state_dict()[k]) for k, v in ref_before.items())
    assert any(not torch.equal(v, ctl.trainer.model.state_dict()[k]) for k, v in ref_before.items())


# -- 8 weight sync ---------------------------------------------------------------------------------------
def test_weight_sync_in_place_and_every_n():
    ctl = roles(sync_every=3, lr=5e-3, prompts=6)
    ptrs = [p.data_ptr() for p in ctl.rollout.model.parameters()]
    equal_at = []
    for _ in range(6):
        m = ctl.step()
        assert m["step/skipped"] == 0
        same = all(torch.equal(a, b) for a, b in zip(ctl.trainer.model.parameters(), ctl.rollout.model.parameters()))
        equal_at.append(same)
    assert equal_at == [False, False, True, False, False, True]
    assert [p.data_ptr() for p in ctl.rollout.model.parameters()] == ptrs
    assert ctl.rollout.version == ctl.trainer.version == 6


def test_stale_rollout_moves_the_ratio():
    ctl = roles(sync_every=4, lr=3e-2)
    ms = [ctl.step() for _ in range(3)]
    assert ms[0]["ratio/abs_log_mean"] < 1e-5 < ms[2]["ratio/abs_log_mean"]
    assert "check/logp_mismatch" in ms[0] and "check/logp_mismatch" not in ms[1]   # only fresh batches


# -- 11 grad accumulation -------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_grad_accumulation_equals_full_batch(agg):
    ctl = roles()
    groups = ctl.rollout.generate(ctl.env, 4)
    ctl.reference.score([t for g in groups for t in g], TOK.pad_id)
    for t in (t for g in groups for t in g):     # arbitrary non-zero advantages, no degenerate skip
        t.advantage = float(len(t.response_ids)) - 2.5
    batch = collate([t for g in groups for t in g], TOK.pad_id)
    algo = make_algorithm({"name": "grpo", "loss_agg": agg}, 4, 6)
    grads = []
    for mbs in (0, 5, 1):
        tr = copy.deepcopy(ctl.trainer)
        tr.micro_batch_size = mbs
        m = tr.accumulate_grads(batch, algo.compute_loss)
        grads.append(([p.grad.clone() for p in tr.model.parameters()], m["loss"]))
    for g, loss in grads[1:]:
        assert loss == pytest.approx(grads[0][1], abs=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, grads[0][0]))


# -- degenerate skip ------------------------------------------------------------------------------------
def test_all_degenerate_step_is_skipped_bit_identically():
    ctl = roles()
    ctl.env = ConstantEnv(ArithmeticTask(max_operands=3), seed=0, tokenizer=TOK)
    before = {k: v.clone() for k, v in ctl.trainer.model.state_dict().items()}
    m = ctl.step()
    assert m["step/skipped"] == 1 and m["groups/degenerate_frac"] == 1
    assert all(torch.equal(v, ctl.trainer.model.state_dict()[k]) for k, v in before.items())
    assert ctl.trainer.opt.state == {} and ctl.syncer.syncs == 0 and ctl.rollout.version == 0
    assert "time/train" not in m and "time/sync" not in m


# -- verifier that raises ---------------------------------------------------------------------------------
class FlakyEnv(ArithmeticEnv):
    def verify(self, prompt, response):
        if len(response) % 2:
            raise ZeroDivisionError("boom")
        return super().verify(prompt, response)


def test_verifier_error_scores_zero_and_is_counted():
    assert safe_verify(FlakyEnv(), Prompt("<1+2>", [], 3), "3").info["verify_error"] == "ZeroDivisionError: boom"
    ctl = roles()
    ctl.env = FlakyEnv(ArithmeticTask(max_operands=3), seed=0, tokenizer=TOK)
    m = ctl.step()
    assert m["verify/errors"] > 0


def test_controller_state_dict_round_trips_every_role():
    ctl = roles(epochs=2)
    ctl.step()
    state = ctl.state_dict()
    assert set(state) == {"trainer", "rollout", "env", "sync"}        # GRPO keeps no state of its own
    other = roles(epochs=2)
    other.load_state_dict(copy.deepcopy(state))   # as from disk: AdamW state is live
    other.trainer.model.load_state_dict(ctl.trainer.model.state_dict())   # weights travel in safetensors
    assert (other.trainer.version, other.rollout.version, other.syncer.steps) == (1, 1, 1)
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "mem/"))}
    assert strip(other.step()) == strip(ctl.step())


# -- 12 controller purity ------------------------------------------------------------------------------
def test_controller_never_touches_tensors():
    src = Path(__import__("rlpt.framework.controller", fromlist=["x"]).__file__).read_text()
    tree = ast.parse(src)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m and m.startswith("torch") for m in imported)
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    # it may gather the roles' state_dict()s, never reach into a role's model
    forbidden = {"backward", "log_softmax", "logits", "parameters", "model", "reward", "advantage", "step_"}
    assert not (attrs | names) & forbidden
