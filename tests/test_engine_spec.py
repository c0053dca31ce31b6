"""Speculative decoding: greedy equals the target's greedy decode; sampling keeps the target's law.

The distribution test samples 8000 four-token continuations of one prompt from a vocabulary of 4
(256 outcomes) with a draft model that disagrees with the target a lot, and runs a chi-square
goodness-of-fit against the target's exact sequence probabilities (enumerated with full forwards).
The same test with a deliberately wrong rule (on rejection, resample from p instead of
norm(max(0, p − q))) must fail by a wide margin: that is what shows the threshold has power.
"""
from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch

import rlpt.engine.spec_decode as spec_decode
from rlpt.engine import LLM, SamplingParams
from rlpt.engine.naive import naive_greedy
from rlpt.framework.trajectory import per_token_logp
from rlpt.gpt_mini.model import GPT

from conftest import tiny_gpt

EOS = 3


# model(seed, std, ...): the shared tiny GPT over a 24-token vocabulary, GQA 4/2; DRAFT: a thinner one
model = partial(tiny_gpt, vocab_size=24, n_head=4, n_kv_head=2, max_seq_len=32)
DRAFT = dict(n_layer=1, d_model=16, d_ff=32)


def prompts(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 24, (int(torch.randint(1, 16, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def check_idle(llm: LLM) -> None:
    llm.check_invariants()
    llm.reset_prefix_cache()
    assert llm.bm.num_free == llm.bm.num_blocks


@pytest.mark.parametrize("kw", [dict(), dict(block_size=4, num_blocks=12, max_num_batched_tokens=10),
                                dict(enable_prefix_caching=False, num_speculative_tokens=2)])
def test_greedy_speculation_equals_target_greedy(kw):
    target, draft = model(0, 0.3), model(7, 0.3, **DRAFT)
    ps = prompts()
    llm = LLM(target, draft_model=draft, eos_id=EOS, **kw)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=16))
    for p, o in zip(ps, outs):
        ref, ref_lp = naive_greedy(target, p, 16, eos_id=EOS)
        assert o.outputs[0].token_ids == ref
        assert torch.allclose(torch.tensor(o.outputs[0].token_logprobs), torch.tensor(ref_lp), atol=1e-4)
    mt = llm.metrics()
    assert 0 < mt["spec/acceptance_rate"] < 1
    if "num_blocks" in kw:
        assert mt["engine/preemptions"] > 0
    check_idle(llm)


def test_draft_equal_to_target_accepts_everything():
    target = model(0, 0.3)
    ps = prompts(8)
    llm = LLM(target, draft_model=target, eos_id=EOS, num_speculative_tokens=4)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == naive_greedy(target, p, 16)[0]
    assert llm.metrics()["spec/acceptance_rate"] == 1.0
    assert llm.metrics()["engine/steps"] <= 2 + 16 // 5 + 1      # ~5 tokens per step after the prefill
    check_idle(llm)


def test_speculative_logprobs_equal_trainer_logprobs():
    target, draft = model(0, 0.08), model(7, 0.3, **DRAFT)
    ps = prompts(8)
    llm = LLM(target, draft_model=draft, eos_id=EOS, block_size=4)
    outs = llm.generate(ps, SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=2))
    for p, o in zip(ps, outs):
        for c in o.outputs:
            ref = per_token_logp(target, torch.tensor([p + c.token_ids]))[0, len(p) - 1:]
            assert torch.allclose(torch.tensor(c.token_logprobs), ref, atol=1e-5, rtol=0)
    check_idle(llm)


# -- the distribution ------------------------------------------------------------------------
V, PROMPT, LEN, N = 4, [1, 2], 4, 8000


def exact_probs(target: GPT) -> torch.Tensor:
    """P(y_1..y_4 | prompt) for all V^4 continuations, in itertools.product order."""
    conts = torch.tensor(list(itertools.product(range(V), repeat=LEN)))            # (256, 4)
    ids = torch.cat([torch.tensor(PROMPT).expand(len(conts), -1), conts], 1)       # (256, 6)
    with torch.no_grad():
        lp = per_token_logp(target, ids)[:, len(PROMPT) - 1:].sum(1)               # (256,)
    return lp.double().exp()


def chi2_pvalue(samples: list[list[int]], probs: torch.Tensor) -> float:
    """Goodness of fit; outcomes with expected count < 5 are pooled into one cell."""
    idx = torch.tensor([sum(t * V ** (LEN - 1 - i) for i, t in enumerate(s)) for s in samples])
    counts = torch.bincount(idx, minlength=V ** LEN).double()
    expected = probs * len(samples)
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    chi2 = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), chi2 / 2))


def sample(target, draft=None, seed=0) -> list[list[int]]:
    llm = LLM(target, draft_model=draft, eos_id=None, max_num_seqs=512, num_speculative_tokens=3)
    out = llm.generate([PROMPT], SamplingParams(n=N, temperature=1.0, max_tokens=LEN, seed=seed))[0]
    check_idle(llm)
    if draft is not None:
        assert 0.2 < llm.metrics()["spec/acceptance_rate"] < 0.9    # plenty of rejections to get right
    return [c.token_ids for c in out.outputs]


@pytest.fixture(scope="module")
def pair():
    kw = dict(vocab_size=V, **DRAFT, max_seq_len=16)
    return model(0, 0.6, **kw), model(5, 0.6, **kw)


def test_speculative_sampling_keeps_the_target_distribution(pair):
    target, draft = pair
    probs = exact_probs(target)
    assert chi2_pvalue(sample(target, seed=1), probs) > 1e-3            # the target alone
    assert chi2_pvalue(sample(target, draft, seed=2), probs) > 1e-3     # speculative


def test_a_wrong_acceptance_rule_fails_the_same_test(pair, monkeypatch):
    target, draft = pair
    monkeypatch.setattr(spec_decode, "residual", lambda p, q: p.clone())    # resample from p: biased
    assert chi2_pvalue(sample(target, draft, seed=2), exact_probs(target)) < 1e-8
