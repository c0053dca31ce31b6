"""Preference learning (lessons 15–16): Bradley–Terry, the DPO family's losses by hand, DPO's closed-form
optimum on the lesson's 4-response toy, the frozen reference, preference files, the reward model and
its env, and `run_dpo` end to end with a bit-identical resume."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import rlpt.gpt_mini.generate
import rlpt.train
from rlpt import sft
from rlpt.checkpoint import CheckpointError
from rlpt.config import ConfigError, load_config
from rlpt.framework.environment import make_env
from rlpt.gpt_mini.generate import Sample
from rlpt.gpt_mini.model import GPT, GPTConfig
from rlpt.gpt_mini.task import ArithmeticTask
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.optim import make_optimizer
from rlpt.preference import data as pdata
from rlpt.preference import dpo
from rlpt.preference.data import PreferenceDataError, PreferencePair, collate_pairs, load_pairs
from rlpt.preference.reward_model import RewardModel, bt_loss, human_score, load_reward_model, pair_metrics
from rlpt.run import Run

TOK = CharTokenizer()
sig = lambda x: 1.0 / (1.0 + math.exp(-x))


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                         max_seq_len=32))


def t(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# -- Bradley–Terry (lesson 15) ---------------------------------------------------------------------------
def test_bradley_terry_scale_and_gradient_weight():
    assert sig(1) == pytest.approx(0.7311, abs=1e-4) and sig(3) == pytest.approx(0.9526, abs=1e-4)
    r_w, r_l = t(1.0, 0.0).requires_grad_(), t(0.0, 3.0)
    loss, m = bt_loss(r_w, r_l)
    assert loss.item() == pytest.approx((-math.log(sig(1)) - math.log(sig(-3))) / 2, abs=1e-12)
    assert m["rm/pair_acc"].item() == 0.5 and m["rm/score_gap"].item() == pytest.approx(-1.0)
    loss.backward()
    # d/dr_w of −log σ(r_w − r_l) is −σ(r_l − r_w): easy pairs fade out (logistic regression)
    assert r_w.grad.tolist() == pytest.approx([-sig(-1) / 2, -sig(3) / 2], abs=1e-12)
    # only differences matter: a common offset changes nothing
    assert bt_loss(r_w.detach() + 5, r_l + 5)[0].item() == pytest.approx(loss.item(), abs=1e-12)


# -- the DPO family by hand (lesson 16) ---------------------------------------------------
def test_dpo_loss_fixture_and_gradient():
    pc, pr = t(-1.0).requires_grad_(), t(-5.0).requires_grad_()
    rc, rr = t(-2.0), t(-3.0)                  # Δ = (−1 + 2) − (−5 + 3) = 3
    loss, m = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(-math.log(sig(0.3)), abs=1e-12)
    assert loss.item() == pytest.approx(0.554355, abs=1e-6)
    assert m["reward/chosen"].item() == pytest.approx(0.1) and m["reward/rejected"].item() == pytest.approx(-0.2)
    assert m["reward/margin"].item() == pytest.approx(0.3) and m["reward/accuracy"].item() == 1.0
    loss.backward()
    # ∂/∂ log π(y_w) = −β σ(−βΔ), ∂/∂ log π(y_l) = +β σ(−βΔ)
    assert pc.grad.item() == pytest.approx(-0.1 * sig(-0.3), abs=1e-12)
    assert pr.grad.item() == pytest.approx(0.1 * sig(-0.3), abs=1e-12)


def test_ipo_minimum_at_one_over_two_beta():
    beta = 0.5
    rc = rr = pr = t(0.0)
    for delta, want in [(1.0, 0.0), (2.0, 1.0), (0.0, 1.0), (3.0, 4.0)]:
        assert dpo.ipo_loss(t(delta), pr, rc, rr, beta)[0].item() == pytest.approx(want, abs=1e-12)
    # Δ is unscaled (the lesson's widget puts β inside h; the paper and rlpt do not)
    assert dpo.ipo_loss(t(10.0), pr, rc, rr, 0.05)[0].item() == pytest.approx(0.0, abs=1e-12)
    # the gradient flips sign past the target: a fixed point, unlike DPO
    grads = []
    for delta in (0.5, 1.5):
        pc = t(delta).requires_grad_()
        dpo.ipo_loss(pc, pr, rc, rr, beta)[0].backward()
        grads.append(pc.grad.item())
    assert grads == pytest.approx([-1.0, 1.0], abs=1e-12)


def test_simpo_length_normalisation_by_hand():
    # chosen: 2 tokens, log π = −2 (−1/token); rejected: 3 tokens, log π = −6 (−2/token); β = 2, γ = 1
    loss, m = dpo.simpo_loss(t(-2.0), t(-6.0), t(2.0), t(3.0), beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(-math.log(sig(2 * -1 - 2 * -2 - 1)), abs=1e-12)   # logits = 1
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    assert m["reward/chosen"].item() == pytest.approx(-2.0) and m["reward/rejected"].item() == pytest.approx(-4.0)
    # the same summed log-probs over other lengths give another loss: only per-token quality counts
    loss2, _ = dpo.simpo_loss(t(-2.0), t(-6.0), t(2.0), t(6.0), beta=2.0, gamma=1.0)
    assert loss2.item() == pytest.approx(-math.log(sig(-2 + 2 - 1)), abs=1e-12)


def test_kto_by_hand_z0_detached_and_clamped():
    pc, pr = t(-1.0).requires_grad_(), t(-3.0).requires_grad_()
    rc, rr = t(-1.5), t(-2.0)                                 # r_w = 0.5, r_l = −1
    kl_p, kl_r = t(-2.0, -2.0).requires_grad_(), t(-2.4, -2.2)  # KL̂ = mean(0.4, 0.2) = 0.3
    loss, m = dpo.kto_loss(pc, pr, rc, rr, kl_p, kl_r, beta=1.0, lam_d=1.0, lam_u=1.0)
    want = ((1 - sig(0.5 - 0.3)) + (1 - sig(0.3 + 1.0))) / 2
    assert loss.item() == pytest.approx(want, abs=1e-12) and loss.item() == pytest.approx(0.332166, abs=1e-6)
    assert m["kto/z0"].item() == pytest.approx(0.3)
    loss.backward()
    assert kl_p.grad is None                                   # the reference point carries no gradient
    # a negative KL estimate is clamped to z0 = 0; λ_D weights the desirable side
    loss0, m0 = dpo.kto_loss(t(-1.0), t(-3.0), rc, rr, t(-3.0), t(-2.0), beta=1.0, lam_d=2.0, lam_u=1.0)
    assert m0["kto/z0"].item() == 0.0
    assert loss0.item() == pytest.approx(((2 - 2 * sig(0.5)) + (1 - sig(1.0))) / 2, abs=1e-12)


def test_orpo_by_hand():
    # chosen and rejected both 2 tokens: mean log π −0.5 and −1.5
    loss, m = dpo.orpo_loss(t(-1.0), t(-3.0), t(2.0), t(2.0), lam=0.1)
    lo = lambda a: a - math.log(1 - math.exp(a))
    want = 0.5 + 0.1 * -math.log(sig(lo(-0.5) - lo(-1.5)))
    assert loss.item() == pytest.approx(want, abs=1e-12) and loss.item() == pytest.approx(0.517086, abs=1e-6)
    assert m["loss/nll"].item() == pytest.approx(0.5)


# -- DPO's optimum on the lesson's toy: 4 responses, uniform reference (lesson 16's widget) ----------------
SCORES = torch.tensor([0.0, 1.0, 2.0, 2.5], dtype=torch.float64)   # hidden A, B, C, D


def expected_pair_loss(theta: torch.Tensor, beta: float) -> torch.Tensor:
    """E over uniform ordered pairs (i, j) and a BT-noisy label of dpo_loss: each ordered pair (w, l)
    appears with weight P(pair) · σ(s_w − s_l)."""
    logp = torch.log_softmax(theta, 0)
    ref = torch.full((4,), -math.log(4), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for w in range(4):
        for l_ in range(4):
            if w != l_:
                loss, _ = dpo.dpo_loss(logp[w:w + 1], logp[l_:l_ + 1], ref[w:w + 1], ref[l_:l_ + 1], beta)
                total = total + loss * torch.sigmoid(SCORES[w] - SCORES[l_]) / 12
    return total


@pytest.mark.parametrize("beta, want_d", [(0.5, 0.702), (2.0, 0.394)])
def test_dpo_toy_converges_to_closed_form(beta, want_d):
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    for _ in range(150):   # exact full-batch gradient steps on the expected loss (convex in θ)
        g, = torch.autograd.grad(expected_pair_loss(theta, beta), theta)
        with torch.no_grad():
            theta -= 5.0 / beta ** 2 * g
    pi = torch.softmax(theta.detach(), 0)
    closed = torch.softmax(SCORES / beta, 0)                   # π* ∝ π_ref · exp(s/β)
    assert pi[3].item() == pytest.approx(want_d, abs=1e-3)
    torch.testing.assert_close(pi, closed, atol=1e-6, rtol=0)
    # the implicit reward gap D − A recovers the true gap 2.5
    assert (beta * (torch.log(pi[3]) - torch.log(pi[0]))).item() == pytest.approx(2.5, abs=1e-5)


def test_dpo_toy_widget_step_matches_autograd():
    """The widget's exact softmax step θ_m += η σ(−βΔ) β (∂log π_w − ∂log π_l) is −η ∇ dpo_loss."""
    theta = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64, requires_grad=True)
    beta, w, l_ = 0.5, 3, 0
    logp = torch.log_softmax(theta, 0)
    ref = torch.full((4,), -math.log(4), dtype=torch.float64)
    loss, _ = dpo.dpo_loss(logp[w:w + 1], logp[l_:l_ + 1], ref[w:w + 1], ref[l_:l_ + 1], beta)
    loss.backward()
    pi = torch.softmax(theta.detach(), 0)
    dlog = lambda k: torch.eye(4, dtype=torch.float64)[k] - pi
    delta = (logp[w] - logp[l_]).item()
    step = sig(-beta * delta) * beta * (dlog(w) - dlog(l_))
    torch.testing.assert_close(-theta.grad, step, atol=1e-12, rtol=0)


# -- sequence log-probs, collate, the reference ----------------------------------------------------------
def test_collate_pairs_and_sequence_logp_sum_response_tokens_only():
    pairs = [PreferencePair("<3+4>", "3+4=7#", "9#"), PreferencePair("<12+5+9>", "26#", "25#")]
    b = collate_pairs(pairs, TOK)
    assert b.ids.shape == (4, 11) and b.mask.shape == (4, 10) and b.n == 2
    texts = [TOK.decode(b.ids[i, 1:][b.mask[i].bool()]) for i in range(4)]
    assert texts == ["3+4=7#", "26#", "9#", "25#"]                   # chosen rows, then rejected rows
    assert b.lengths.tolist() == [6, 3, 2, 3]
    model = tiny_gpt()
    logp, lens = dpo.sequence_logp(model, b.ids, b.mask)
    full = torch.log_softmax(model(b.ids), -1)
    for i, (p, r) in enumerate([(x.prompt, x.chosen) for x in pairs] + [(x.prompt, x.rejected) for x in pairs]):
        P, ids = len(p), TOK.encode(p + r)
        want = sum(full[i, P - 1 + k, ids[P + k]] for k in range(len(r)))
        assert logp[i].item() == pytest.approx(want.item(), abs=1e-5)
    assert lens.tolist() == [6, 3, 2, 3]


def test_reference_frozen_excluded_and_absent_for_simpo_orpo():
    policy = tiny_gpt()
    ref = dpo.make_reference(policy, "dpo")
    assert ref is not policy and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    opt, _ = make_optimizer(policy, dpo.DPOConfig().optim, 10)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in ref.parameters()}
    for a, b in zip(policy.parameters(), ref.parameters()):      # a deep copy: separate storage, same values
        assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)
    batch = collate_pairs([PreferencePair("<3+4>", "7#", "8#")] * 2, TOK)
    cfg = dpo.DPOConfig()
    before = [p.clone() for p in ref.parameters()]
    loss, m = dpo.preference_loss(cfg, policy, ref, batch, TOK.pad_id)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in ref.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, ref.parameters()))
    assert m["reward/margin"].item() == pytest.approx(0.0, abs=1e-6)   # π = π_ref at the start: Δ = 0
    assert dpo.make_reference(policy, "simpo") is None and dpo.make_reference(policy, "orpo") is None
    for method in ("simpo", "orpo", "ipo", "kto"):
        loss, _ = dpo.preference_loss(dpo.DPOConfig(method=method), policy,
                                      dpo.make_reference(policy, method), batch, TOK.pad_id)
        assert torch.isfinite(loss)


def test_precomputed_reference_equals_per_step_reference():
    policy = tiny_gpt()
    ref = dpo.make_reference(policy, "dpo")
    with torch.no_grad():
        for p in policy.parameters():   # the policy has moved away from the reference
            p.add_(0.01 * torch.randn_like(p))
    pairs = [PreferencePair("<3+4>", "3+4=7#", "8#"), PreferencePair("<12+5+9>", "26#", "12+5=17,"),
             PreferencePair("<1+1>", "2#", "3#")]
    table = dpo.precompute_reference(ref, pairs, TOK, batch=2)                # two chunks, other padding
    b = collate_pairs(pairs, TOK)
    direct, _ = dpo.sequence_logp(ref, b.ids, b.mask)
    torch.testing.assert_close(torch.cat([table[:, 0], table[:, 1]]), direct, atol=1e-5, rtol=0)
    cfg = dpo.DPOConfig()
    l1, m1 = dpo.preference_loss(cfg, policy, ref, b, TOK.pad_id)
    l2, _ = dpo.preference_loss(cfg, policy, ref, b, TOK.pad_id, torch.cat([table[:, 0], table[:, 1]]))
    assert l1.item() == pytest.approx(l2.item(), abs=1e-6) and m1["reward/margin"] != 0


def test_dpo_config_defaults_and_key_errors():
    job = load_config(dpo.DPOJob, None, [])
    assert job.dpo.beta_value == 0.5 and job.dpo.lam == 0.1
    assert load_config(dpo.DPOJob, None, ["dpo.method=ipo"]).dpo.beta_value == 0.1
    assert load_config(dpo.DPOJob, None, ["dpo.method=simpo"]).dpo.beta_value == 2.0
    assert load_config(dpo.DPOJob, None, ["dpo.method=kto", "dpo.beta=0.3"]).dpo.beta_value == 0.3
    with pytest.raises(ConfigError, match="dpo.method"):
        load_config(dpo.DPOJob, None, ["dpo.method=ppo"])
    with pytest.raises(ConfigError, match="dpo.beta"):
        load_config(dpo.DPOJob, None, ["dpo.beta=-1"])
    with pytest.raises(ConfigError, match="dpo.pairs.kk"):
        load_config(dpo.DPOJob, None, ["dpo.pairs.kk=3"])
    with pytest.raises(ConfigError, match="init_from is required"):
        dpo.run_dpo(job)


# -- preference files and sampled pairs ----------------------------------------------------------------------
def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_pairs_errors_and_counted_skips(tmp_path):
    good = {"prompt": "<3+4>", "chosen": "7#", "rejected": "8#"}
    f = _write(tmp_path / "p.jsonl", [good, {"prompt": "<3+4>", "rejected": "8#"}])
    with pytest.raises(PreferenceDataError, match=r"p\.jsonl:2: missing field 'chosen'"):
        load_pairs(f, TOK, 32)
    f = _write(tmp_path / "p.jsonl", [good, "", {"prompt": "<3+4>", "chosen": 7, "rejected": "8#"}])
    with pytest.raises(PreferenceDataError, match=r"p\.jsonl:3: field 'chosen' must be a string"):
        load_pairs(f, TOK, 32)
    f = _write(tmp_path / "p.jsonl", ["{not json"])
    with pytest.raises(PreferenceDataError, match=r"p\.jsonl:1: not valid JSON"):
        load_pairs(f, TOK, 32)
    f = _write(tmp_path / "p.jsonl", [{"prompt": "<3+4>", "chosen": "7!", "rejected": "8#"}])
    with pytest.raises(PreferenceDataError, match=r"p\.jsonl:1: character '!'"):
        load_pairs(f, TOK, 32)
    same = {"prompt": "<3+4>", "chosen": "7#", "rejected": "7#"}
    long = {"prompt": "<3+4>", "chosen": "7#", "rejected": "3+4=7," * 5 + "7#"}   # 5 + 32 > 32 tokens
    pairs, skips = load_pairs(_write(tmp_path / "p.jsonl", [good, same, long, same]), TOK, 32)
    assert pairs == [PreferencePair("<3+4>", "7#", "8#")] and skips == {"identical": 2, "too_long": 1}
    with pytest.raises(PreferenceDataError, match="no usable pair.*identical"):
        load_pairs(_write(tmp_path / "p.jsonl", [same]), TOK, 32)
    with pytest.raises(PreferenceDataError, match="does not exist"):
        load_pairs(tmp_path / "nope.jsonl", TOK, 32)


def test_sample_pairs_on_scripted_samples(monkeypatch):
    """Pairs from a scripted policy: mixed groups pair (cleanest correct, wrong); uniform groups are counted."""
    task = ArithmeticTask(min_operands=2, max_operands=2)
    calls = []

    def gen(model, prompts, sp, eos, pad, g=None):
        res = []
        for i, p in enumerate(prompts):
            text = TOK.decode(p)
            a, b = map(int, text[1:-1].split("+"))
            group = ([f"{a + b}#", f"{a}+{b}={a + b}#", f"{a}+{b}={a + b + 1}#", f"{a}+{b}={a + b + 1},{a + b}#"]
                     if a < 5 else [f"{a + b}#"] * 4)
            res.append(Sample(TOK.encode(group[i % 4]), [], "stop"))
        calls.append(len(prompts))
        return res

    monkeypatch.setattr(rlpt.gpt_mini.generate, "generate", gen)   # what sample_texts calls
    pairs, stats = pdata.sample_pairs(None, TOK, task, n_prompts=20, k=4, temperature=1.0, max_tokens=16, seed=0,
                                      fmt="cot", max_pairs_per_prompt=2)
    assert stats["prompts"] == 20 and stats["samples"] == 80
    mixed = stats["prompts_with_pairs"]
    assert stats["prompts_all_correct"] + mixed == 20 and stats["prompts_all_wrong"] == 0
    assert len(pairs) == stats["pairs"] == mixed                   # one distinct wrong sample per mixed prompt
    for p in pairs:
        a, b = map(int, p.prompt[1:-1].split("+"))
        assert p.chosen == f"{a}+{b}={a + b}#"                      # the canonical CoT beats `N#` and lucky steps
        assert p.rejected == f"{a}+{b}={a + b + 1}#"
    with pytest.raises(ValueError, match="k >= 2"):
        pdata.sample_pairs(None, TOK, task, 4, 1, 1.0, 16, 0)


def test_sample_groups_draws_what_sample_texts_draws():
    """The progress bar's chunks are sample_texts' own batches: the same samples, even when k does not
    divide the batch (10 prompts x 3 samples in batches of 7)."""
    from rlpt.gpt_mini.generate import SamplingParams, sample_texts
    model, sp = tiny_gpt(), SamplingParams(max_tokens=6, temperature=1.0)
    prompts = [f"<{a}+{a + 1}>" for a in range(10)]
    want = sample_texts(model, TOK, prompts, 3, sp, torch.Generator().manual_seed(0), batch=7)
    got = pdata.sample_groups(model, TOK, prompts, 3, sp, torch.Generator().manual_seed(0), batch=7, progress=True)
    assert got == want and len(got) == 30


def test_cut_at_first_error():
    cut = pdata.cut_at_first_error
    assert cut("7+6=13,13+4=17,17+7=24#", "7+6=13,13+4=18,18+7=25#") == "7+6=13,13+4=18,"
    assert cut("7+6=13,13+4=17,17+7=24#", "7+6=13,13+4=17,17+7=25#") == "7+6=13,13+4=17,17+7=25#"
    assert cut("24#", "25#") == "25#" and cut("3+4=7#", "3+4=7,7+1=8#") == "3+4=7,"
    assert cut("12#", "12") == "12"                                # no step end after the split: kept whole


def test_cleanliness_prefers_true_steps_then_short():
    got = sorted(["3+4=8,8+5=12#", "3+4=7,7+5=12#", "12#"], key=lambda r: pdata.cleanliness(r, None))
    assert got == ["12#", "3+4=7,7+5=12#", "3+4=8,8+5=12#"]
    assert pdata.steps_valid("3+4=7,7+5=12#") and not pdata.steps_valid("3+4=8,8+5=12#")


# -- the reward model and its env -------------------------------------------------------------------------
def _toy_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Separable by form (the RLHF demo's taste): the concise answer beats the worked one."""
    import random
    rng, out = random.Random(seed), []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append(PreferencePair(f"<{a}+{b}>", f"{a + b}#", f"{a}+{b}={a + b}#"))
    return out


def test_reward_model_learns_separable_preference():
    rm = RewardModel(tiny_gpt(1), TOK.pad_id)
    assert rm(collate_pairs(_toy_pairs(4, 0), TOK).ids).abs().max().item() == 0.0   # the head starts at zero
    train, held = _toy_pairs(256, 0), _toy_pairs(64, 1)
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    import random
    rng = random.Random(0)
    for _ in range(60):
        b = collate_pairs(rng.sample(train, 32), TOK)
        s = rm(b.ids)
        loss, _ = bt_loss(s[:b.n], s[b.n:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m = pair_metrics(rm, held, TOK)
    assert m["rm/pair_acc_heldout"] >= 0.9 and m["rm/score_gap_heldout"] > 0.5


def test_reward_model_reads_last_real_token():
    rm = RewardModel(tiny_gpt(2), TOK.pad_id)
    torch.nn.init.normal_(rm.head.weight)
    ids = torch.tensor([TOK.encode("<3+4>7#")])
    padded = torch.cat([ids, torch.full((1, 5), TOK.pad_id)], 1)
    assert rm(padded).item() == pytest.approx(rm(ids).item(), abs=1e-5)   # padding is invisible


def test_reward_model_env_scores_and_path_wiring(tmp_path):
    rm = RewardModel(tiny_gpt(3), TOK.pad_id)
    torch.nn.init.normal_(rm.head.weight)
    run = Run(tmp_path, "rm", load_config(dpo.DPOJob, None, []))
    run.save(1, rm, rm.meta(), {"step": 1})
    env = make_env("reward_model", task=ArithmeticTask(), seed=0, tokenizer=TOK, model_path=str(run.dir))
    prompt = env.heldout(1)[0]
    for response in (f"{prompt.gold}#", f"{prompt.gold + 1}#", "3+4=7#"):
        v = env.verify(prompt, response)
        want = rm.score_texts(TOK, [(prompt.ids, response)])[0]
        assert v.reward == pytest.approx(want, abs=1e-6)
        assert v.info["correct"] == (response == f"{prompt.gold}#")
        assert v.info["human_score"] == (2.0 if v.info["correct"] else 0.0)
    assert all(not p.requires_grad for p in env.rm.parameters())
    with pytest.raises(ConfigError, match="env.model_path"):
        make_env("reward_model", task=ArithmeticTask(), seed=0, tokenizer=TOK)
    with pytest.raises(CheckpointError, match="not a reward model"):
        sft_run = Run(tmp_path, "pol", load_config(dpo.DPOJob, None, []))
        pol = tiny_gpt()
        sft_run.save(1, pol, pol.cfg.to_dict(), {"step": 1})
        load_reward_model(sft_run.dir)
    assert human_score("3+4=7#", 7) == 1.0 and human_score("7#", 7) == 2.0 and human_score("8#", 7) == 0.0


def test_train_job_wires_env_model_path(tmp_path):
    from rlpt.train import TrainJob
    with pytest.raises(ConfigError, match="env.model_path"):
        load_config(TrainJob, None, ["env.name=reward_model"])
    with pytest.raises(ConfigError, match="env.model_path"):
        load_config(TrainJob, None, ["env.name=arithmetic", "env.model_path=/x"])
    job = load_config(TrainJob, None, ["env.name=judge", "env.model_path=/some/sft"])
    assert job.env.model_path == "/some/sft"


# -- run_dpo end to end --------------------------------------------------------------------------------------
DPO_TINY = ["dpo.steps=6", "dpo.batch_size=4", "dpo.log_every=1", "dpo.ckpt_every=2", "eval.size=4",
            "eval.every=3", "eval.max_tokens=8", "run.progress=false", "dpo.optim.warmup_steps=1",
            "dpo.optim.lr=1e-3"]


@pytest.fixture
def sft_start(tiny_job):
    _, run, _ = sft.train_sft(tiny_job("sft.steps=2", "run.name=sft"))
    return run


def _dpo_job(sft_run, tmp_path, *over):
    pairs = _write(tmp_path / "pairs.jsonl", [vars(p) for p in _toy_pairs(12, 0)])
    from conftest import TINY
    model = [o for o in TINY if o.startswith("model.")]
    return load_config(dpo.DPOJob, None, [*model, *DPO_TINY, f"init_from={sft_run.dir}",
                                          f"run.out_dir={tmp_path / 'runs'}", f"dpo.pairs.file={pairs}", *over])


def test_run_dpo_end_to_end_and_resume_is_bit_identical(sft_start, tmp_path, monkeypatch):
    model_a, run_a, final_a = dpo.run_dpo(_dpo_job(sft_start, tmp_path, "run.name=a"))
    rows = run_a.read_metrics()
    assert rows[0]["step"] == 0 and "acc/heldout" in rows[0] and rows[0]["pairs/pairs"] == 12
    assert [r["step"] for r in rows if "acc/heldout" in r] == [0, 3, 6]
    for k in ("loss", "loss/dpo", "reward/margin", "reward/accuracy", "logp/chosen", "logp/rejected", "grad/norm"):
        assert k in rows[-1]
    assert (run_a.dir / "pairs.jsonl").exists() and final_a["pairs"] == 12
    assert set(final_a) >= {"acc/heldout_start", "acc/heldout_final", "reward/margin"}

    job = _dpo_job(sft_start, tmp_path, "run.name=b")
    real, n = dpo.preference_loss, []

    def crash(*a, **k):
        n.append(1)
        if len(n) == 5:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(dpo, "preference_loss", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dpo.run_dpo(job)
    monkeypatch.undo()
    (tmp_path / "pairs.jsonl").unlink()                            # resume reads the run folder's copy
    model_b, run_b, final_b = dpo.run_dpo(job, resume=True)
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time/elapsed"} for r in rs]
    assert strip(run_b.read_metrics()) == strip(rows) and final_b == final_a


def test_run_dpo_simpo_builds_no_reference(sft_start, tmp_path, monkeypatch):
    made = []
    real = dpo.make_reference
    monkeypatch.setattr(dpo, "make_reference", lambda p, m: made.append(r := real(p, m)) or r)
    _, run, _ = dpo.run_dpo(_dpo_job(sft_start, tmp_path, "run.name=s", "dpo.method=simpo", "dpo.steps=2"))
    assert made == [None] and "loss/simpo" in run.read_metrics()[-1]


def test_cli_dpo(sft_start, tmp_path, capsys):
    from rlpt.cli import main
    job = _dpo_job(sft_start, tmp_path)
    args = [f"init_from={job.init_from}", f"run.out_dir={job.run.out_dir}", "run.name=cli",
            f"dpo.pairs.file={job.dpo.pairs.file}", "dpo.steps=2", *[o for o in DPO_TINY if "steps" not in o]]
    from conftest import TINY
    args += [o for o in TINY if o.startswith("model.")]
    assert main(["dpo", *args]) == 0
    assert "acc/heldout_final" in capsys.readouterr().out
    assert main(["dpo", "dpo.method=nope"]) == 2
    assert "dpo.method" in capsys.readouterr().err
    assert main(["rm", f"run.out_dir={tmp_path}"]) == 2                 # the RM needs its SFT trunk
    assert "init_from is required for rlpt rm" in capsys.readouterr().err


# -- the RM job and RL against it -------------------------------------------------------------------------
def test_train_rm_job_calibrates_and_rl_trains_against_it(sft_start, tmp_path):
    from rlpt.preference.reward_model import RMJob, train_rm
    from rlpt.train import load_train_job, run_train

    from conftest import TINY
    model = [o for o in TINY if o.startswith("model.")]
    pairs = _write(tmp_path / "rm_pairs.jsonl", [vars(p) for p in _toy_pairs(40, 0)])
    job = load_config(RMJob, None, [*model, f"init_from={sft_start.dir}", f"run.out_dir={tmp_path / 'runs'}",
                                    f"rm.pairs.file={pairs}", "rm.steps=4", "rm.batch_size=8", "rm.eval_every=2",
                                    "rm.log_every=1", "run.progress=false", "rm.optim.lr=3e-3"])
    rm, run, final = train_rm(job)
    assert final["pairs/train"] == 36 and final["pairs/heldout"] == 4          # 10% held out of the file
    # BT's free offset is pinned: 0 halfway between the held-out chosen and rejected means
    assert final["rm/chosen_mean_heldout"] + final["rm/rejected_mean_heldout"] == pytest.approx(0.0, abs=1e-5)
    loaded = load_reward_model(run.dir)
    held = load_pairs(run.dir / "pairs_heldout.jsonl", TOK, 32)[0]
    assert pair_metrics(loaded, held, TOK) == pytest.approx(pair_metrics(rm, held, TOK), abs=1e-6)   # saved calibrated
    rl = load_train_job(None, [*model, f"init_from={sft_start.dir}", f"run.out_dir={tmp_path / 'runs'}",
                               "run.name=ppo_rm", "env.name=reward_model", f"env.model_path={run.dir}",
                               "algorithm.name=ppo", "steps=2", "rollout.k=2", "rollout.prompts_per_step=2",
                               "rollout.max_tokens=12", "eval.size=4", "eval.every=2", "run.progress=false"])
    _, rl_run, _ = run_train(rl)
    rows = [r for r in rl_run.read_metrics() if "reward/mean" in r]
    assert len(rows) == 2 and all(math.isfinite(r["reward/mean"]) for r in rows)


# -- the RLHF example (examples/rlhf.py) drives the ordinary jobs --------------------------------------------
def _example(name: str):
    import importlib.util
    import sys
    examples = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))           # what `python examples/rlhf.py` puts first on the path
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", examples / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod            # pydantic resolves the module's annotations through it
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(examples))
    return mod


def test_rlhf_example_mixed_demonstrations_weigh_each_style_by_its_share():
    import random
    rlhf = _example("rlhf")
    draw = rlhf.mixed_demonstrations(ArithmeticTask(min_operands=2, max_operands=2), TOK, 8, 0.5)
    ids, mask = draw(random.Random(3))
    texts = [TOK.decode(ids[i, 1:][mask[i] > 0]) for i in range(8)]
    styles = ["cot" if "=" in t else "direct" for t in texts]
    n = {s: styles.count(s) for s in ("direct", "cot")}
    assert n["direct"] > 0 and n["cot"] > 0                  # this seed draws both styles
    tokens = {s: sum(len(t) for t, u in zip(texts, styles) if u == s) for s in n}
    for i, s in enumerate(styles):                           # every target token of style s: n_s / (N · T_s)
        assert mask[i][mask[i] > 0].tolist() == pytest.approx([n[s] / (8 * tokens[s])] * len(texts[i]))
    assert mask.sum().item() == pytest.approx(1.0)           # so sft_loss's mean is Σ_s (n_s/N)·mean NLL_s


def test_rlhf_example_drives_sft_rm_and_ppo_jobs_and_reuses_their_folders(tmp_path, capsys):
    from conftest import TINY
    rlhf = _example("rlhf")
    pairs = _write(tmp_path / "pairs.jsonl", [vars(p) for p in _toy_pairs(40, 0)])
    args = ["recipes/rlhf_arith.yaml", *[o for o in TINY if o.startswith("model.")], "model.max_seq_len=48",
            f"run.out_dir={tmp_path}", "run.progress=false", "sft.steps=2", "sft.batch_size=8", "eval.size=4",
            "eval.max_tokens=8", "rm.steps=2", "rm.batch_size=4", f"rm.pairs.file={pairs}", "ppo.betas=[0.5]",
            "ppo.steps=2", "ppo.eval_every=1", "ppo.eval_prompts=2", "ppo.k=2", "ppo.prompts_per_step=2",
            "ppo.max_tokens=8"]
    assert rlhf.main(args) == 0
    root = tmp_path / "rlhf"
    for stage, steps in (("sft", 2), ("rm", 2), ("ppo_beta0.5", 2)):   # each an ordinary, finished run folder
        assert (root / stage / "checkpoints" / "latest").read_text() == f"step_{steps:08d}", stage
    ppo = load_config(rlpt.train.TrainJob, root / "ppo_beta0.5" / "config.yaml")
    assert ppo.env.name == "reward_model" and ppo.env.model_path == str(root / "rm")
    assert ppo.init_from == str(root / "sft" / "checkpoints" / "step_00000002")
    sweep = json.loads((root / "sweep.json").read_text())
    rows = sweep["runs"]["0.5"]
    assert [r["step"] for r in rows] == [0, 1, 2] and sweep["rm"]["pairs/train"] == 36
    assert all(r["gold/score"] >= 0 and "rm/score" in r for r in rows)
    before = {d: (root / d / "metrics.jsonl").read_text() for d in ("sft", "rm", "ppo_beta0.5")}
    capsys.readouterr()
    assert rlhf.main(args) == 0                                      # a rerun trains nothing again
    assert capsys.readouterr().out.count("reusing the finished run") == 3
    assert {d: (root / d / "metrics.jsonl").read_text() for d in before} == before
    assert json.loads((root / "sweep.json").read_text()) == sweep   # the proxy/gold scores are seeded
    page = rlhf.write_page({0.5: rows}, sweep["rm"], args, rlhf.load_config(rlhf.RLHFJob, args[0], args[1:]),
                           tmp_path)
    assert "python examples/rlhf.py recipes/rlhf_arith.yaml" in page.read_text()
