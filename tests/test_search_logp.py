"""Lesson 17: the PRM that reads its trunk's own step log-probabilities (`rlpt prm scorer.logp_feature=true`).

The head adds a · (Σ_step log π, Σ_prefix log π, min_step log π) at each delimiter to w · h + b. These tests
check the features by hand, that the score moves with the trunk's log-prob of a step it reads and with
nothing else the language-model head outputs, that the untrained scorer is the generative verifier, and that
the flag survives a checkpoint.
"""
from __future__ import annotations

import math

import pytest
import torch

from rlpt.checkpoint import save_checkpoint
from rlpt.gpt_mini.task import Problem
from rlpt.search.scorer import LogProbScorer, StepScorer, load_scorer, logp_features

from conftest import TINY_SHAPE, TOK, tiny_gpt

P3 = Problem((3, 4, 5))
RESP = "3+4=7,7+5=12#"


def token_logps(model, prompt: str, response: str) -> list[float]:
    ids = torch.tensor([TOK.encode(prompt + response)])
    logp = torch.log_softmax(model(ids).float(), -1)[0]
    P = len(TOK.encode(prompt))
    return [logp[t - 1, ids[0, t]].item() for t in range(P, ids.shape[1])]


def test_logp_features_are_the_steps_summed_prefix_and_min_log_probs():
    model = tiny_gpt()
    lp = token_logps(model, P3.prompt, RESP)
    ids = torch.tensor([TOK.encode(P3.prompt + RESP)])
    f = logp_features(model(ids), ids, TOK)[0]                                # (T, 3)
    P, cut = len(P3.prompt), RESP.index(",")
    want = [(sum(lp[:cut + 1]), sum(lp[:cut + 1]), min(lp[:cut + 1])),       # step 1 ends at the `,`
            (sum(lp[cut + 1:]), sum(lp), min(lp[cut + 1:]))]                  # step 2 at the `#`
    for got, w in zip((f[P + cut], f[-1]), want):
        assert got.tolist() == pytest.approx(list(w), rel=1e-5, abs=1e-6)
    assert torch.equal(f[:P], torch.zeros(P, 3))                             # the prompt's tokens are not read


def test_logp_prm_score_moves_with_the_step_log_prob_it_reads_and_nothing_else():
    scorer = StepScorer(tiny_gpt(), TOK, "prm", logp_feature=True)
    torch.nn.init.normal_(scorer.head.weight, std=0.1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scorer.feat.weight.copy_(torch.tensor([[0.3, 1.0, 0.2]]))
    P, cut, T = len(P3.prompt), RESP.index(","), len(P3.prompt + RESP)
    ids = torch.tensor([TOK.encode(P3.prompt + RESP)])
    read = [P + cut, T - 1]                  # the delimiters, where the PRM is read (its logits: σ⁻¹ of the scores)
    assert scorer.read_positions(P, TOK.encode(RESP)) == read

    def bumped(pos: int | None = None, token: str = "9") -> list[float]:
        """The head's logits at the delimiters with the LM logit of `token` at sequence position `pos` raised
        by 3 (the hidden states are untouched: the hook changes the trunk's output logits only)."""
        def hook(mod, args, out):
            out = out.clone()
            out[:, pos, TOK.stoi[token]] += 3.0
            return out
        h = scorer.trunk.register_forward_hook(hook) if pos is not None else None
        try:
            with torch.no_grad():
                return scorer(ids)[0, read].tolist()
        finally:
            if h:
                h.remove()

    base = bumped()
    step2 = bumped(P + cut + 1)              # the logits that predict the 2nd step's 2nd token (`+`)
    assert step2[0] == base[0] and abs(step2[1] - base[1]) > 1e-3
    step1 = bumped(P)                        # predicting step 1's 2nd token: both prefixes' scores move
    assert abs(step1[0] - base[0]) > 1e-3 and abs(step1[1] - base[1]) > 1e-3
    for pos in (*range(P - 1), T - 1):       # predicting prompt tokens, or past the `#`: never read
        assert bumped(pos) == base
    with torch.no_grad():                    # the same bump with the feature weights at zero: no effect at all
        scorer.feat.weight.zero_()
    base0 = bumped()
    assert bumped(P + cut + 1) == base0 and bumped(P) == base0
    plain = StepScorer(tiny_gpt(), TOK, "prm")
    assert not hasattr(plain, "feat") and plain.meta()["logp_feature"] is False


def test_untrained_logp_prm_is_the_generative_verifier_and_survives_a_checkpoint(tmp_path):
    model = tiny_gpt()
    rows = [(P3.prompt, RESP), (Problem((3, 4, 5, 6)).prompt, "3+4=8,8+5=13,")]
    p = LogProbScorer(model, TOK).score(rows)
    scorer = StepScorer(model, TOK, "prm", logp_feature=True)
    got = scorer.score(rows)
    for g, q in zip(got, p):                 # σ(log p) = p / (1 + p)
        assert g == pytest.approx([x / (1 + x) for x in q], rel=1e-5)
    with torch.no_grad():
        scorer.head.bias.fill_(0.7)
    save_checkpoint(tmp_path / "ckpt", scorer, scorer.meta(), {"step": 0})
    back = load_scorer(tmp_path / "ckpt")
    assert back.logp_feature
    for a, b in zip(back.score(rows), scorer.score(rows)):
        assert a == pytest.approx(b, rel=1e-6)
    assert back.score(rows)[0][0] == pytest.approx(1 / (1 + math.exp(-(math.log(p[0][0]) + 0.7))), rel=1e-5)


def test_aux_model_features_are_read_frozen_and_survive_a_checkpoint(tmp_path):
    """scorer.logp_aux: a second model's three features join the trunk's; it gets no gradient, and at the start
    the score is σ(log π(prefix) + log π_aux(prefix))."""
    trunk, aux = tiny_gpt(0), tiny_gpt(1)
    scorer = StepScorer(trunk, TOK, "prm", logp_feature=True, aux=aux)
    rows = [(P3.prompt, RESP)]
    p, q = LogProbScorer(trunk, TOK).score(rows)[0], LogProbScorer(aux, TOK).score(rows)[0]
    ids = torch.tensor([TOK.encode(P3.prompt + RESP)])
    read = scorer.read_positions(len(P3.prompt), TOK.encode(RESP))
    logits = scorer(ids)[0, read]
    assert logits.tolist() == pytest.approx([math.log(a * b) for a, b in zip(p, q)], rel=1e-5)
    logits.sum().backward()
    assert all(w.grad is None for w in aux.parameters()) and scorer.feat.weight.grad.shape == (1, 6)
    assert scorer.feat.weight.grad[0, 3:].abs().sum() > 0              # the aux features reach the loss
    with torch.no_grad():                    # bump the aux's logits inside step 2: the second score moves
        def hook(mod, args, out):
            out = out.clone()
            out[:, len(P3.prompt) + RESP.index(",") + 1, TOK.stoi["9"]] += 3.0
            return out
        h = aux.register_forward_hook(hook)
        bumped = scorer(ids)[0, read]
        h.remove()
    assert bumped[0] == logits[0] and abs(bumped[1] - logits[1]) > 1e-3
    save_checkpoint(tmp_path / "ckpt", scorer, scorer.meta(), {"step": 0})
    back = load_scorer(tmp_path / "ckpt")
    assert back.aux is not None and back.score(rows)[0] == pytest.approx(scorer.score(rows)[0], rel=1e-6)
    with pytest.raises(ValueError, match="logp_feature"):
        StepScorer(tiny_gpt(), TOK, "prm", aux=tiny_gpt(1))


def test_calibrate_folds_one_scale_and_shift_into_the_feature_path():
    """StepScorer.calibrate: logit' = s · logit + c with (s, c) the logistic fit on the read positions, folded into
    the feature weights and the bias (so the ranking at the read positions is unchanged)."""
    from rlpt.search.scorer import bce_at, boundary_targets
    scorer = StepScorer(tiny_gpt(0), TOK, "prm", logp_feature=True, aux=tiny_gpt(1))
    rows = [(P3.prompt, RESP, [1.0, 1.0]), (P3.prompt, "3+4=8,8+5=13#", [0.0, 0.0]),
            (Problem((3, 4, 5, 6)).prompt, "3+4=7,7+5=12,12+6=18#", [1.0, 1.0, 1.0])]
    ids, target, mask = boundary_targets(scorer, [TOK.encode(p) for p, _, _ in rows],
                                         [TOK.encode(r) for _, r, _ in rows], [y for *_, y in rows], [1.0, 0.0, 1.0])
    with torch.no_grad():
        before = scorer(ids)
    s, c = scorer.calibrate(ids, target, mask)
    with torch.no_grad():
        after = scorer(ids)
    assert torch.allclose(after, s * before + c, rtol=1e-4, atol=1e-3)
    assert bce_at(after, target, mask) < bce_at(before, target, mask)
    best = bce_at(s * before + c, target, mask)           # (s, c) is the fit: any nudge of either costs BCE
    for ds, dc in ((0.05, 0), (-0.05, 0), (0, 0.05), (0, -0.05)):
        assert bce_at((s + ds) * before + c + dc, target, mask) > best
    with torch.no_grad():
        scorer.head.weight.fill_(0.1)
    with pytest.raises(ValueError, match="head weight zero"):
        scorer.calibrate(ids, target, mask)


def test_a_trunk_with_its_own_rope_theta_loads_and_the_prm_keeps_it(tmp_path):
    """A PRM's trunk need not share the policy's `model.*` keys (docs/search.md 3d: a completer trained with
    model.rope_theta=1e30 under a 1e4 policy): jobs.load_own reads the trunk's stored config where the policy's
    check refuses it, and load_scorer rebuilds the trunk with that theta (the same weights at 1e4 score otherwise)."""
    from rlpt.checkpoint import CheckpointError
    from rlpt.config import ConfigError, ModelConfig
    from rlpt.gpt_mini.model import GPT, GPTConfig, load_model
    from rlpt.search.jobs import load_own
    trunk = tiny_gpt(0, std=0.3, rope_theta=1e30)
    save_checkpoint(tmp_path / "trunk", trunk, trunk.cfg.to_dict(), {"step": 0})
    with pytest.raises(CheckpointError, match="rope_theta"):
        load_model(tmp_path / "trunk", ModelConfig(**TINY_SHAPE), TOK)          # the policy's keys: refused
    own = load_own(tmp_path / "trunk", TOK)
    assert own.cfg.rope_theta == 1e30
    wide = tiny_gpt(0, vocab_size=TOK.vocab_size + 1)                       # another tokenizer: a clear error
    save_checkpoint(tmp_path / "wide", wide, wide.cfg.to_dict(), {"step": 0})
    with pytest.raises(ConfigError, match="vocab_size"):
        load_own(tmp_path / "wide", TOK)
    rows = [(P3.prompt, RESP), (Problem((3, 4, 5, 6)).prompt, "3+4=8,8+5=13,")]
    scorer = StepScorer(own, TOK, "prm", logp_feature=True)
    save_checkpoint(tmp_path / "prm", scorer, scorer.meta(), {"step": 0})
    back = load_scorer(tmp_path / "prm")
    assert back.trunk.cfg.rope_theta == 1e30
    assert back.score(rows) == scorer.score(rows)
    other = GPT(GPTConfig(**{**own.cfg.to_dict(), "rope_theta": 1e4}))
    other.load_state_dict(own.state_dict())
    assert StepScorer(other, TOK, "prm", logp_feature=True).score(rows)[1] != pytest.approx(
        scorer.score(rows)[1], rel=1e-3, abs=0)
