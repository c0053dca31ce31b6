"""The six algorithms against lessons 09–14: hand-computed fixtures, exact identities,
dynamic sampling, config errors, and a short run of each through `rlpt.train.run_train`."""
import ast
import copy
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import rlpt.algorithms  # noqa: F401 - registers the algorithms make_algorithm builds
from rlpt.algorithms.dapo import degenerate_fraction, overlong_penalty
from rlpt.algorithms.ppo import gae
from rlpt.checkpoint import load_state, save_checkpoint
from rlpt.cli import main as cli_main
from rlpt.config import ConfigError
from rlpt.framework.algorithm import ALGORITHMS, AlgorithmConfigError, make_algorithm
from rlpt.framework.controller import Controller
from rlpt.framework.environment import ArithmeticEnv, Verdict, register_env
from rlpt.framework.reference import Reference
from rlpt.framework.rollout import GroupFilter, Rollout
from rlpt.framework.trainer import Trainer
from rlpt.framework.trajectory import Trajectory, collate
from rlpt.framework.weight_sync import WeightSyncer
from rlpt.gpt_mini.generate import SamplingParams
from rlpt.gpt_mini.task import ArithmeticTask
from rlpt.loop import _label
from rlpt.train import LAST10, PROGRESS, load_train_job, run_train

from conftest import SFT_SHAPE, TINY_SFT, TOK, ConstantEnv, ParityEnv, tiny_gpt

NAMES = ["reinforce", "ppo", "grpo", "rloo", "dapo", "drgrpo"]


def algo(name, k=4, max_tokens=8, **kw):
    return make_algorithm({"name": name, **kw}, group_size=k, max_tokens=max_tokens)


def traj(prompt, response, mask=None, old=None, reward=0.0, adv=0.0):
    R = len(response)
    return Trajectory(prompt, response, torch.tensor(mask if mask else [1.0] * R),
                      torch.tensor(old if old else [0.0] * R), reward=reward, advantage=adv)


def group(rewards, lengths=None):
    return [traj([1], [2] * (lengths[i] if lengths else 1), reward=r) for i, r in enumerate(rewards)]


def advs(name, rewards, **kw):
    g = group(rewards)
    algo(name, k=len(rewards), **kw).compute_advantages([g])
    return [t.advantage for t in g], g[0].degenerate


# -- advantages (lessons 11, 12) ------------------------------------------------------------------------
@pytest.mark.parametrize("r,unbiased,population", [
    ([1, 0, 1, 0], [0.866, -0.866, 0.866, -0.866], [1, -1, 1, -1]),
    ([1, 1, 1, 0], [0.5, 0.5, 0.5, -1.5], [0.577, 0.577, 0.577, -1.732]),
    ([1, 0, 0, 0], [1.5, -0.5, -0.5, -0.5], [1.732, -0.577, -0.577, -0.577])])
def test_grpo_advantages_unbiased_std(r, unbiased, population):
    a, degenerate = advs("grpo", r)
    assert a == pytest.approx(unbiased, abs=1e-3) and not degenerate
    rt = torch.tensor(r, dtype=torch.float32)       # the lesson tables use ddof = 0; rlpt (like TRL, verl) ddof = 1
    assert ((rt - rt.mean()) / rt.std(correction=0)).tolist() == pytest.approx(population, abs=1e-3)


@pytest.mark.parametrize("name", ["grpo", "rloo", "dapo", "drgrpo"])
@pytest.mark.parametrize("r", [[1, 1, 1, 1], [0, 0, 0, 0]])
def test_all_equal_group_is_zero_and_degenerate(name, r):
    a, degenerate = advs(name, r)
    assert a == [0, 0, 0, 0] and degenerate


@pytest.mark.parametrize("r", [[1, 0], [1, 0, 0, 1], [1, 0, 0, 0, 1, 1, 0, 1], [0.5, 2.0, -1.0, 0.0]])
def test_rloo_leave_one_out_is_centred_times_k_over_k_minus_1(r):
    K = len(r)
    a, _ = advs("rloo", r)
    loo = [r[i] - (sum(r) - r[i]) / (K - 1) for i in range(K)]
    centred, _ = advs("drgrpo", r)                      # r − mean, no /std
    assert a == pytest.approx(loo, abs=1e-6)
    assert [x / c for x, c in zip(a, centred) if abs(c) > 1e-9] == pytest.approx([K / (K - 1)] * K, abs=1e-5)
    assert {2: 2.0, 4: 1.3333, 8: 1.1429}[K] == pytest.approx(K / (K - 1), abs=1e-4)


def test_reinforce_raw_reward_and_running_baseline_state():
    a, degenerate = advs("reinforce", [1, 0, 1, 1])
    assert a == [1, 0, 1, 1] and not degenerate
    assert advs("reinforce", [0, 0, 0, 0])[1] and not advs("reinforce", [1, 1, 1, 1])[1]   # only all-zero A drops
    r = algo("reinforce", baseline=True, baseline_decay=0.9)
    g1, g2 = group([1, 0, 1, 1]), group([0, 0, 1, 0])
    r.compute_advantages([g1])                          # no history yet: b = 0
    assert [t.advantage for t in g1] == [1, 0, 1, 1]
    r.compute_advantages([g2])                          # b = 0.1·0.75 / (1 − 0.9) = 0.75 (bias-corrected)
    assert [t.advantage for t in g2] == pytest.approx([-0.75, -0.75, 0.25, -0.75])
    again = algo("reinforce", baseline=True, baseline_decay=0.9)
    again.load_state_dict(copy.deepcopy(r.state_dict()))
    assert again.baseline_value == r.baseline_value == pytest.approx((0.9 * 0.075 + 0.1 * 0.25) / (1 - 0.81))


# -- clip (lesson 10's clip table, lesson 13's clip-higher) ---------------------------------------------
def one_token(name, rho, adv, **kw):
    """-min(ρA, clip(ρ)A) and its gradient, through the algorithm's own compute_loss (β = 0)."""
    t = traj([1], [2], adv=adv)
    t.ref_logp = torch.zeros(1)
    t.extra = {"values": torch.zeros(1), "returns": torch.zeros(1)} if name == "ppo" else {}
    b = collate([t], pad_id=0)
    new = torch.full_like(b.old_logp, math.log(rho)).requires_grad_(True)
    a = algo(name, beta=0.0, **kw)
    loss, m = a.compute_loss(b, new, values=torch.zeros_like(new)) if name == "ppo" else a.compute_loss(b, new)
    loss.backward()
    return -float(m["loss/pg"]), float(new.grad.abs().sum())


@pytest.mark.parametrize("rho,adv,objective,flows", [(0.7, 1, 0.70, True), (0.7, -1, -0.80, False),
                                                     (1.0, 1, 1.00, True), (1.0, -1, -1.00, True),
                                                     (1.4, 1, 1.20, False), (1.4, -1, -1.40, True)])
def test_ppo_clip_table_six_cells(rho, adv, objective, flows):
    obj, grad = one_token("ppo", rho, adv, value_coef=0.0)
    assert obj == pytest.approx(objective, abs=1e-6)
    assert (grad > 0) == flows                       # killed only at (0.7, A<0) and (1.4, A>0)


@pytest.mark.parametrize("rho,adv,objective,flows", [(1.25, 1, 1.25, True), (1.3, 1, 1.28, False),
                                                     (0.75, -1, -0.80, False), (0.85, -1, -0.85, True),
                                                     (0.7, 1, 0.70, True), (1.4, -1, -1.40, True)])
def test_dapo_clip_higher_is_asymmetric(rho, adv, objective, flows):
    obj, grad = one_token("dapo", rho, adv)          # ε_low = 0.2, ε_high = 0.28
    assert obj == pytest.approx(objective, abs=1e-6) and (grad > 0) == flows
    assert one_token("grpo", 1.25, 1)[1] == 0        # symmetric ε = 0.2 clips what DAPO lets through


# -- length bias (lesson 14) ----------------------------------------------------------------------------
def per_token_push(name, **kw):
    """∂(−loss)/∂logp for one token of a 10-token and one of a 200-token answer, both A = 0.5, K = 2."""
    ts = [traj([1], [2] * 10, adv=0.5), traj([1], [2] * 200, adv=0.5)]
    for t in ts:
        t.ref_logp = torch.zeros(len(t.response_ids))
    b = collate(ts, pad_id=0)
    new = b.old_logp.clone().requires_grad_(True)
    a = algo(name, k=2, max_tokens=200, beta=0.0, **kw)
    a.compute_loss(b, new)[0].backward()
    return -float(new.grad[0, 0]), -float(new.grad[1, 0])


def test_length_bias_ratios_grpo_dapo_drgrpo():
    s, l = per_token_push("grpo")                    # A/(K·|y_i|): the lesson's A/|y_i| averaged over K = 2
    assert (2 * s, 2 * l) == pytest.approx((0.05, 0.0025)) and l / s == pytest.approx(10 / 200)
    s, l = per_token_push("dapo")                    # A / Σ|y_i| = 0.5 / 210
    assert s == l == pytest.approx(0.00238, abs=1e-5)
    s, l = per_token_push("drgrpo", norm_len=1)      # the lesson's constant K: A/K
    assert s == l == pytest.approx(0.25)
    s, l = per_token_push("drgrpo")                  # default L = max_tokens: A/(K·L), still ratio 1
    assert s == l == pytest.approx(0.5 / (2 * 200))
    for name in ("reinforce", "rloo"):               # constant normaliser too
        s, l = per_token_push(name)
        assert s == pytest.approx(l)


# -- GAE and the value loss (lesson 10) -----------------------------------------------------------------
def test_gae_hand_computed():
    r, v = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.2, 0.5, 0.7])
    adv, ret = gae(r, v, 1.0, 1.0)                   # Monte-Carlo: A_t = R − V(s_t), returns = R
    assert adv.tolist() == pytest.approx([0.8, 0.5, 0.3]) and ret.tolist() == pytest.approx([1, 1, 1])
    adv, ret = gae(r, v, 0.9, 0.95)                  # δ = [0.25, 0.13, 0.3]; A_t = δ_t + 0.855 A_{t+1}
    assert adv.tolist() == pytest.approx([0.5804575, 0.3865, 0.3], abs=1e-6)
    assert ret.tolist() == pytest.approx([0.7804575, 0.8865, 1.0], abs=1e-6)
    adv, _ = gae(r, v, 1.0, 0.0)                     # TD(0): A_t = δ_t
    assert adv.tolist() == pytest.approx([0.3, 0.2, 0.3])


def test_ppo_advantages_skip_tool_tokens_and_use_old_values():
    t = traj([1], [2, 3, 4, 5], mask=[1, 0, 1, 1], reward=1.0)     # token 1 is tool output
    t.extra = {"values": torch.tensor([0.2, 0.9, 0.5, 0.7])}
    algo("ppo", gamma=0.9, lam=0.95, whiten=False).compute_advantages([[t]])
    assert t.advantage.tolist() == pytest.approx([0.5804575, 0.0, 0.3865, 0.3], abs=1e-6)
    assert t.extra["returns"].tolist() == pytest.approx([0.7804575, 0.0, 0.8865, 1.0], abs=1e-6)
    assert t.degenerate is False
    b = collate([t], pad_id=0)                       # per-token advantage and extras land in the logp columns
    assert b.advantage[0].tolist() == pytest.approx([0.5804575, 0.0, 0.3865, 0.3], abs=1e-6)
    assert b.extra["values"][0].tolist() == pytest.approx([0.2, 0.0, 0.5, 0.7])
    w = copy.deepcopy(t)
    w.advantage = 0.0
    algo("ppo").compute_advantages([[w]])            # whitened over the policy's tokens
    a = w.advantage[w.response_mask > 0]
    assert float(a.mean()) == pytest.approx(0, abs=1e-6) and float(a.std()) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("clip,loss,frac", [(None, 0.5 * 0.26, None), (0.2, 0.5 * 0.36, 0.5)])
def test_ppo_value_loss_and_clipping(clip, loss, frac):
    t = traj([1], [2, 3])
    t.ref_logp = torch.zeros(2)
    t.extra = {"values": torch.tensor([0.2, 0.5]), "returns": torch.tensor([1.0, 1.0])}
    b = collate([t], pad_id=0)
    new_v = torch.tensor([[0.6, 0.4]])               # unclipped (V − R)² = 0.16, 0.36; clipped V = 0.4, 0.4
    _, m = algo("ppo", value_clip=clip).compute_loss(b, b.old_logp.clone(), values=new_v)
    assert float(m["loss/value"]) == pytest.approx(loss)
    assert (float(m["value/clip_frac"]) if frac is not None else None) == frac


# -- the critic in the framework ------------------------------------------------------------------------
def roles(section, env=None, prompts=3, k=4, epochs=1, lr=1e-2):
    """The six roles wired the way rlpt.train.build wires them (critic, group filter)."""
    policy = tiny_gpt()
    a = make_algorithm(section, k, 6)
    critic = a.make_critic(policy)
    rollout = Rollout(copy.deepcopy(policy), TOK, prompts, SamplingParams(max_tokens=6), group_filter=a.group_filter)
    ref = Reference(policy, scorers={"values": critic} if critic else None)
    params = torch.nn.ModuleList([policy, critic]) if critic else policy
    opt = torch.optim.AdamW(params.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    trainer = Trainer(policy, opt, None, 1.0, 0, 1, epochs, critic=critic)
    env = env or ParityEnv(ArithmeticTask(max_operands=3), seed=0, tokenizer=TOK)
    return Controller(rollout, env, ref, a, trainer, WeightSyncer(1), k, TOK.pad_id)


@pytest.mark.parametrize("name", NAMES)
def test_every_hook_has_a_neutral_default(name):
    """Callers never probe: each hook exists on every algorithm, and only the algorithm that uses it sets it."""
    a = algo(name)
    assert (a.make_critic(tiny_gpt()) is not None) == (name == "ppo")
    assert (a.group_filter is not None) == (name == "dapo")
    assert algo(name, dynamic_sampling=False).group_filter is None if name == "dapo" else True
    assert a.state_dict() == ({"ema": 0.0, "seen": 0} if name == "reinforce" else {})
    if name != "reinforce":
        a.load_state_dict({})                          # the state it saved: nothing
        with pytest.raises(ValueError, match="keeps no state"):
            a.load_state_dict({"ema": 0.5})            # a checkpoint from another algorithm fails loudly


def test_controller_state_holds_the_algorithm_only_when_it_has_state_and_resumes_it():
    base = roles({"name": "reinforce", "baseline": True, "baseline_decay": 0.5})
    base.step()
    state = base.state_dict()
    assert set(state) == {"trainer", "rollout", "env", "sync", "algorithm"}
    assert state["algorithm"] == {"ema": base.algorithm.ema, "seen": 1} and state["sync"]["syncs"] == 1
    assert set(roles({"name": "grpo"}).state_dict()) == {"trainer", "rollout", "env", "sync"}
    resumed = roles({"name": "reinforce", "baseline": True, "baseline_decay": 0.5})
    resumed.load_state_dict(copy.deepcopy(state))   # as from disk: AdamW state is live
    resumed.trainer.model.load_state_dict(base.trainer.model.state_dict())   # weights travel in safetensors
    assert resumed.algorithm.baseline_value == base.algorithm.baseline_value != 0.0
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "mem/"))}
    assert strip(resumed.step()) == strip(base.step())


def ppo_batch(ctl):
    groups = ctl.rollout.generate(ctl.env, ctl.k)
    ctl.reference.score([t for g in groups for t in g], TOK.pad_id)
    ctl.algorithm.compute_advantages(groups)
    return collate([t for g in groups for t in g], TOK.pad_id)


def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("head", ["separate", "shared"])
def test_critic_values_recorded_optimised_and_owned_once(head):
    ctl = roles({"name": "ppo", "value_head": head}, epochs=2)
    critic, policy = ctl.trainer.critic, ctl.trainer.model
    n_policy = len(list(policy.parameters()))
    assert len(list(critic.parameters())) == (2 if head == "shared" else n_policy + 2)   # head = weight, bias
    torch.nn.init.normal_(critic.head.weight, std=0.5)   # a non-zero head, so the trunk sees value gradients
    b = ppo_batch(ctl)
    with torch.no_grad():                            # the reference side recorded V_old = critic at these weights
        assert torch.allclose(b.extra["values"], critic(b.input_ids) * b.mask, atol=1e-6)
    g = {}
    for coef in (0.0, 0.5):
        tr = copy.deepcopy(ctl.trainer)
        a = make_algorithm({"name": "ppo", "value_head": head, "value_coef": coef}, 4, 6)
        tr.accumulate_grads(b, a.compute_loss)
        g[coef] = grads(tr.model), grads(tr.critic)
    same_policy = all(torch.equal(x, y) for x, y in zip(g[0.0][0], g[0.5][0]))
    assert same_policy == (head == "separate")       # a shared trunk also learns from the value loss
    assert any(x.abs().sum() > 0 for x in g[0.5][1])
    head_before = critic.head.weight.clone()
    m = ctl.step()
    assert m["loss/value"] > 0 and m["grad/norm_critic"] > 0 and m["train/optimizer_steps"] == 2
    assert not torch.equal(head_before, critic.head.weight)


def test_value_loss_grad_accumulation_equals_full_batch():
    ctl = roles({"name": "ppo", "value_clip": 0.1})
    torch.nn.init.normal_(ctl.trainer.critic.head.weight, std=0.5)
    b = ppo_batch(ctl)
    out = []
    for mbs in (0, 1):
        tr = copy.deepcopy(ctl.trainer)
        tr.micro_batch_size = mbs
        m = tr.accumulate_grads(b, ctl.algorithm.compute_loss)
        out.append((grads(tr.model) + grads(tr.critic), m["loss/value"]))
    assert out[0][1] == pytest.approx(out[1][1], abs=1e-6)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(out[0][0], out[1][0]))


# -- DAPO: degenerate fraction, overlong penalty, dynamic sampling (lesson 13) --------------------------
@pytest.mark.parametrize("p,K,table", [(0.5, 4, 0.125), (0.7, 4, 0.248), (0.9, 4, 0.656), (0.5, 8, 0.0078),
                                       (0.7, 8, 0.058), (0.9, 8, 0.43), (0.9, 16, 0.185), (0.7, 16, 0.0033)])
def test_degenerate_fraction_formula_and_simulation(p, K, table):
    assert degenerate_fraction(p, K) == pytest.approx(table, abs=6e-4 if table < 0.1 else 6e-3)
    gen = torch.Generator().manual_seed(K)
    r = torch.rand(200_000, K, generator=gen) < p
    sim = float((r.all(1) | (~r).all(1)).float().mean())
    assert sim == pytest.approx(degenerate_fraction(p, K), abs=5e-3)


def test_overlong_penalty_at_the_boundaries():
    lengths = torch.tensor([0, 26, 27, 29, 32, 40])  # L_max 32, buffer 6: ramp from 26 to 32
    assert overlong_penalty(lengths, 32, 6).tolist() == pytest.approx([0, 0, 1 / 6, 0.5, 1, 1])
    assert algo("dapo", max_tokens=32).cfg.overlong_buffer == 6          # default 20 % of max_tokens


def test_dapo_filter_on_raw_rewards_then_penalty():
    g = group([1, 1, 1, 1], lengths=[5, 5, 5, 32])   # all correct, one truncated
    algo("dapo", max_tokens=32).compute_advantages([g])
    assert [t.info["shaped_reward"] for t in g] == [1, 1, 1, 0]   # truncated: verifier credit − full penalty
    assert g[0].degenerate and all(t.advantage == 0 for t in g)   # raw all equal: dropped
    g = group([1, 1, 1, 1], lengths=[5, 5, 5, 32])
    algo("dapo", max_tokens=32, dynamic_sampling=False).compute_advantages([g])
    assert not g[0].degenerate                               # no filter: the penalty is the signal
    assert [t.advantage for t in g] == pytest.approx([0.5, 0.5, 0.5, -1.5], abs=1e-4)
    g = group([1, 0], lengths=[32, 5])               # mixed raw, but 1 − 1 = 0 − 0 after the penalty
    algo("dapo", k=2, max_tokens=32).compute_advantages([g])
    assert g[0].degenerate


class KindEnv(ArithmeticEnv):
    """Prompts alternate: even ones score 1 on every sample (degenerate); odd ones alternate 1, 0 (mixed)."""
    def __init__(self, **kw):
        super().__init__(ArithmeticTask(max_operands=3), seed=0, tokenizer=TOK)
        self.prompts = self.calls = 0

    def reset(self, split="train"):
        p = super().reset(split)
        p.meta["kind"], self.prompts = self.prompts % 2, self.prompts + 1
        return p

    def verify(self, prompt, response):
        self.calls += 1
        return Verdict(1.0 if prompt.meta["kind"] == 0 else float(self.calls % 2))


def mixed(g):
    return len({t.reward for t in g}) > 1


@pytest.mark.parametrize("max_draws,oversample,draws,drawn,kept,cap", [
    (4, 1.0, 4, 8, 4, 0),    # 4 prompts → 2 pass; 2 → 1; 1 → 0; 1 → 1: refilled to the target
    (3, 1.0, 3, 7, 3, 1),    # cap hit one short: trains on 3
    (4, 2.0, 1, 8, 4, 0),    # over-sampling 2×: one round does it
    (4, 3.0, 1, 12, 4, 0)])  # 12 drawn, 6 pass, surplus dropped
def test_dynamic_sampling_refills_respects_cap_and_reports(max_draws, oversample, draws, drawn, kept, cap):
    rollout = Rollout(tiny_gpt(), TOK, 4, SamplingParams(max_tokens=4),
                            group_filter=GroupFilter(mixed, max_draws=max_draws, oversample=oversample))
    groups = rollout.generate(KindEnv(), 4)
    s = rollout.stats
    assert len(groups) == kept and all(mixed(g) for g in groups)
    assert (s["sampling/draws"], s["sampling/groups_drawn"], s["sampling/groups_kept"], s["sampling/cap_hit"]) == \
        (draws, drawn, kept, cap)
    assert s["sampling/filtered_frac"] == pytest.approx(1 - (drawn // 2) / drawn)
    assert len({g[0].group for g in groups}) == kept          # groups numbered across rounds


def test_dynamic_sampling_through_the_controller_and_nothing_passing():
    ctl = roles({"name": "dapo", "max_draws": 4, "overlong_coef": 0.0}, env=KindEnv(), prompts=4)
    m = ctl.step()
    assert m["sampling/draws"] == 4 and m["sampling/groups_drawn"] == 8 and m["sampling/cap_hit"] == 0
    assert m["step/skipped"] == 0 and m["groups/kept"] == 1 and "loss" in m
    ctl = roles({"name": "dapo", "max_draws": 2}, env=ConstantEnv(ArithmeticTask(max_operands=3), tokenizer=TOK))
    before = {k: v.clone() for k, v in ctl.trainer.model.state_dict().items()}
    m = ctl.step()                                   # never loops forever: 2 rounds, then the step is skipped
    assert m["sampling/draws"] == 2 and m["sampling/cap_hit"] == 1 and m["step/skipped"] == 1
    assert all(torch.equal(v, ctl.trainer.model.state_dict()[k]) for k, v in before.items())


# -- config errors name the key -------------------------------------------------------------------------
@pytest.mark.parametrize("name,key,value", [
    ("grpo", "clip_eps", 0.0), ("grpo", "clip_eps", -0.1), ("drgrpo", "clip_eps", 0.0),
    ("dapo", "clip_eps_high", 0.1), ("dapo", "clip_eps", -1.0), ("dapo", "max_draws", 0), ("dapo", "oversample", 0.5),
    ("dapo", "overlong_coef", -1.0), ("dapo", "overlong_buffer", 64), ("dapo", "overlong_max_len", -1),
    ("ppo", "gamma", 1.5), ("ppo", "gamma", -0.1), ("ppo", "lam", 1.01), ("ppo", "lam", -0.5),
    ("ppo", "clip_eps", 0.0), ("ppo", "value_coef", -0.5), ("ppo", "value_clip", 0.0), ("ppo", "value_head", "tied"),
    ("reinforce", "baseline_decay", 1.0), ("reinforce", "beta", -0.1), ("rloo", "clip_eps", 0.2)])
def test_config_errors_name_the_key(name, key, value):
    with pytest.raises(AlgorithmConfigError, match=f"algorithm.{key}"):
        make_algorithm({"name": name, key: value}, group_size=4, max_tokens=32)


@pytest.mark.parametrize("name", NAMES)
def test_group_size_one_only_where_no_group_baseline(name):
    if ALGORITHMS[name].needs_groups:
        with pytest.raises(AlgorithmConfigError, match="rollout.k"):
            make_algorithm({"name": name}, group_size=1, max_tokens=8)
    else:
        make_algorithm({"name": name}, group_size=1, max_tokens=8)
    assert ALGORITHMS[name].needs_groups == (name in ("grpo", "rloo", "dapo", "drgrpo"))


def test_config_error_through_a_train_job_names_the_key():
    with pytest.raises(ConfigError, match="algorithm.lam"):
        load_train_job(None, ["algorithm.name=ppo", "algorithm.lam=2"])


# -- each algorithm through rlpt.train ------------------------------------------------------------------
@register_env("test_first_char")
class FirstCharEnv(ArithmeticEnv):
    """Reward 1 when the first character's code is even: mixed groups from a random model."""
    def verify(self, prompt, response):
        return Verdict(float(bool(response) and ord(response[0]) % 2 == 0))


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    model = tiny_gpt(**SFT_SHAPE)           # the shape of TINY_SFT's model overrides
    return save_checkpoint(tmp_path_factory.mktemp("init") / "init", model, model.cfg.to_dict(), {"step": 0})


def train_job(init, out, name, *overrides):
    return load_train_job(None, [*TINY_SFT, f"init_from={init}", f"run.out_dir={out}", f"run.name={name}",
                                 "env.name=test_first_char", "rollout.k=4", "rollout.prompts_per_step=2",
                                 "rollout.max_tokens=8", "steps=3", "eval.every=3", "ckpt_every=3",
                                 f"algorithm.name={name.split('_')[0]}", *overrides])


@pytest.mark.parametrize("name", NAMES)
def test_three_step_run_of_each_algorithm(name, init_ckpt, tmp_path):
    extra = {"ppo": ["trainer.epochs=2"], "reinforce": ["algorithm.baseline=true"]}.get(name, [])
    ctl, run, final = run_train(train_job(init_ckpt, tmp_path, name, *extra))
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and "acc/heldout" in rows[-1]
    steps = [r for r in rows[1:] if not r["step/skipped"]]
    assert steps, "every step was skipped: the smoke run trained nothing"
    for key in ("loss", "loss/pg", "kl/mean", "grad/norm", "reward/mean"):
        assert all(math.isfinite(r[key]) for r in steps), key
    assert ("clip/frac" in steps[0]) == (name not in ("reinforce", "rloo"))
    assert ("loss/value" in steps[0] and "grad/norm_critic" in steps[0]) == (name == "ppo")
    assert ("sampling/groups_drawn" in rows[1]) == (name == "dapo")
    for key in ("acc/heldout_final", "reward/mean_last10", "loss_last10", "kl/mean_last10", "grad/norm_last10"):
        assert key in final
    assert ("clip/frac_last10" in final) == (name not in ("reinforce", "rloo"))
    assert (run.dir / "checkpoints" / "latest").exists()


def tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name,extra", [
    ("ppo", ["trainer.epochs=2", "trainer.mini_batches=2", "algorithm.lam=0.95", "algorithm.value_clip=0.2"]),
    ("ppo_shared", ["trainer.epochs=2", "algorithm.value_head=shared"]),
    ("reinforce", ["algorithm.baseline=true", "algorithm.baseline_decay=0.5"])])
def test_checkpoint_resume_is_bit_identical(name, extra, init_ckpt, tmp_path):
    over = ["steps=4", "ckpt_every=2", "keep_checkpoints=5", "eval.every=4", *extra]
    _, run_a, _ = run_train(train_job(init_ckpt, tmp_path, name, *over))
    b_dir = tmp_path / "resumed"
    shutil.copytree(run_a.dir, b_dir)                # the same run, cut back to its step-2 checkpoint
    (b_dir / "checkpoints" / "latest").write_text("step_00000002")
    shutil.rmtree(b_dir / "checkpoints" / "step_00000004")
    ctl_b, run_b, _ = run_train(train_job(init_ckpt, tmp_path, name, *over, "run.name=resumed"), resume=True)
    a, b = (load_state(r.dir / "checkpoints" / "step_00000004") for r in (run_a, run_b))
    assert tensors_equal(*(load_file(str(r.dir / "checkpoints/step_00000004/model.safetensors"))
                           for r in (run_a, run_b)))
    for part in ("trainer", "rollout", "env", "sync", "algorithm"):
        assert tensors_equal(a.get(part), b.get(part)), part
    if name.startswith("ppo"):
        assert a["trainer"]["critic"] is not None and "head.weight" in a["trainer"]["critic"]
    else:
        assert a["algorithm"]["seen"] == 4
    machine = ("time/", "mem/")   # wall clock and memory marks differ between two identical runs
    strip = [{k: v for k, v in r.items() if not k.startswith(machine)} for r in run_b.read_metrics()]
    assert strip == [{k: v for k, v in r.items() if not k.startswith(machine)} for r in run_a.read_metrics()]


def test_cli_entry_point_prints_the_training_table(init_ckpt, tmp_path, capsys):
    argv = [*TINY_SFT, f"init_from={init_ckpt}", f"run.out_dir={tmp_path}", "env.name=test_first_char", "rollout.k=4",
            "rollout.prompts_per_step=2", "rollout.max_tokens=8", "steps=2", "trainer.epochs=2"]
    assert cli_main(["train", "algorithm.name=ppo", *argv]) == 0
    out = capsys.readouterr().out
    for key in ("acc/heldout_final", "reward/mean_last10", "loss_last10", "kl/mean_last10", "grad/norm_last10",
                "clip/frac_last10", "loss/value_last10", "run folder"):
        assert key in out, key
    assert len({_label(k) for k in PROGRESS}) == len(PROGRESS) and set(PROGRESS) <= set(LAST10) | {"acc/heldout"}


@pytest.mark.parametrize("name", NAMES)
def test_each_file_documents_itself_and_imports_only_below_it(name):
    import importlib
    mod = importlib.import_module(f"rlpt.algorithms.{name}")
    doc = mod.__doc__
    assert f"rlpt train algorithm.name={name}" in doc and "Paper:" in doc and "Length bias:" in doc
    assert "Advantage:" in doc and "Loss:" in doc and "Diff from" in doc
    assert len(doc.splitlines()) <= 40                # fits a screen with the code on the next
    tree = ast.parse(open(mod.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert all(m.split(".")[1] in ("framework", "algorithms") for m in imported if m.startswith("rlpt.")), imported
    # what its runs want from the trainer is data on the class, read by `rlpt train algorithm.name=...`
    assert ALGORITHMS[name].trainer_defaults == (("trainer.epochs=4",) if name == "ppo" else ())
