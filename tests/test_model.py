"""gpt_mini and its sampler: the KV cache equals the full forward, batching changes nothing, and the
log-probs recorded at sampling time are the trainer's log-probs (fp32, 1e-5)."""
from __future__ import annotations

import pytest
import torch

from rlpt.gpt_mini.generate import SamplingParams, generate, processed_logp
from rlpt.gpt_mini.model import GPT, GPTConfig

from conftest import tiny_gpt

ATOL = 1e-5
VOCAB, PAD, EOS = 24, 0, 16


def tiny(n_kv_head: int = 4, tie: bool = True, std: float = 0.15, max_seq_len: int = 40) -> GPT:
    """The shared tiny GPT (4 heads) with weights large enough that logits are far from uniform (a real test
    of 1e-5), the norms perturbed too."""
    return tiny_gpt(seed=1, std=std, norm_std=0.1, vocab_size=VOCAB, n_head=4, n_kv_head=n_kv_head,
                    max_seq_len=max_seq_len, tie_embeddings=tie)


def rand_ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


VARIANTS = [pytest.param(kv, tie, id=f"kv{kv}-{'tied' if tie else 'untied'}")
            for kv in (4, 2, 1) for tie in (True, False)]


@pytest.mark.parametrize("n_kv_head,tie", VARIANTS)
@torch.no_grad()
def test_kv_cache_matches_full_forward(n_kv_head, tie):
    model = tiny(n_kv_head, tie)
    assert (model.lm_head.weight is model.embed.weight) == tie
    ids = rand_ids(3, 30)
    full = model(ids)                                                     # (B, T, V)
    assert full.std() > 0.5                                               # logits are not near-uniform
    cache = model.new_cache(3)
    parts, t = [], 0
    for n in [7, 5, 1, 1, 3, 1] + [1] * 12:                               # chunked prefill, then single steps
        parts.append(model(ids[:, t:t + n], cache=cache))
        t += n
    assert t == 30 and cache.pos == 30
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_kv_cache_select_drops_rows():
    model = tiny(2)
    ids = rand_ids(3, 12)
    full = model(ids)
    cache = model.new_cache(3)
    model(ids[:, :8], cache=cache)
    cache.select(torch.tensor([0, 2]))
    out = torch.cat([model(ids[[0, 2], t:t + 1], cache=cache) for t in range(8, 12)], 1)
    torch.testing.assert_close(out, full[[0, 2], 8:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_kv_head,tie", [(4, True), (2, False)])
def test_batched_left_padded_generate_equals_per_row(n_kv_head, tie):
    model = tiny(n_kv_head, tie, std=0.3)
    prompts = [rand_ids(1, n, seed=n)[0].tolist() for n in (1, 6, 3, 9, 4)]
    sp = SamplingParams(max_tokens=12, temperature=0.0)
    batched = generate(model, prompts, sp, eos_id=EOS, pad_id=PAD)
    for p, b in zip(prompts, batched):
        (single,) = generate(model, [p], sp, eos_id=EOS, pad_id=PAD)
        assert b.tokens == single.tokens and b.finish_reason == single.finish_reason
        torch.testing.assert_close(torch.tensor(b.logps), torch.tensor(single.logps), atol=ATOL, rtol=0)
    assert any(len(b.tokens) > 3 for b in batched)


def _full_forward_logps(model, prompts, samples, sp: SamplingParams | None):
    """The trainer's view: one plain forward over prompt + response, log-prob of each sampled token."""
    got, want = [], []
    for p, s in zip(prompts, samples):
        seq = torch.tensor([p + s.tokens])
        with torch.no_grad():
            logits = model(seq)[0, len(p) - 1:len(p) - 1 + len(s.tokens)]     # (n, V): predicts each token
        logp = torch.log_softmax(logits, -1) if sp is None else processed_logp(logits, sp)
        want.append(logp.gather(-1, torch.tensor(s.tokens)[:, None]).squeeze(-1))
        got.append(torch.tensor(s.logps))
    return torch.cat(got), torch.cat(want)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_sampled_logps_equal_full_forward_at_temperature_1(n_kv_head):
    model = tiny(n_kv_head, tie=n_kv_head == 4)
    prompts = [rand_ids(1, n, seed=10 + n)[0].tolist() for n in (2, 7, 4, 5, 1, 3)] * 3
    sp = SamplingParams(max_tokens=16, temperature=1.0)
    samples = generate(model, prompts, sp, EOS, PAD, generator=torch.Generator().manual_seed(0))
    assert sum(len(s.tokens) for s in samples) > 60
    got, want = _full_forward_logps(model, prompts, samples, None)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert model.training is False


def test_sampled_logps_with_temperature_top_p_top_k():
    model = tiny(2)
    prompts = [rand_ids(1, n, seed=20 + n)[0].tolist() for n in (3, 6, 1, 8)] * 4
    for sp in (SamplingParams(max_tokens=16, temperature=0.7, top_p=0.9),
               SamplingParams(max_tokens=16, temperature=1.3, top_k=5),
               SamplingParams(max_tokens=16, temperature=0.0, top_p=0.5)):
        samples = generate(model, prompts, sp, EOS, PAD, generator=torch.Generator().manual_seed(1))
        got, want = _full_forward_logps(model, prompts, samples, sp)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert torch.isfinite(got).all()
    # and the processed distribution is really truncated: at top_p 0.9 it differs from the plain softmax
    logits = model(torch.tensor([prompts[0]]))[0]
    lp = processed_logp(logits, SamplingParams(temperature=0.7, top_p=0.9))
    assert torch.isinf(lp).any() and torch.allclose(lp.exp().sum(-1), torch.ones(len(prompts[0])))


def test_processed_logp_fixture():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    lp = processed_logp(logits, SamplingParams(top_p=0.8))    # 0.5 + 0.3 reaches 0.8: keep two
    torch.testing.assert_close(lp.exp(), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    lp = processed_logp(logits, SamplingParams(top_k=3))
    torch.testing.assert_close(lp.exp(), torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    lp = processed_logp(logits, SamplingParams(temperature=0.5))   # p^2, renormalised
    p2 = torch.tensor([[0.25, 0.09, 0.0225, 0.0025]])
    torch.testing.assert_close(lp.exp(), p2 / p2.sum())


def test_generate_stops_at_eos_and_length():
    model = tiny(4, std=0.3)
    (s,) = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0.0), eos_id=EOS, pad_id=PAD)
    assert len(s.tokens) <= 5 and len(s.tokens) == len(s.logps)
    assert (s.finish_reason == "stop") == (EOS in s.tokens)
    # whichever token greedy picks first, calling it EOS makes generation stop right there
    (e,) = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0.0), eos_id=s.tokens[0], pad_id=PAD)
    assert e.tokens == s.tokens[:1] and e.finish_reason == "stop"


@pytest.mark.parametrize("kwargs,match", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_k": -1}, "top_k"),
])
def test_sampling_params_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_too_long_sequence_raises():
    model = tiny(max_seq_len=16)
    with pytest.raises(ValueError, match=r"17 tokens exceeds model.max_seq_len=16"):
        model(rand_ids(1, 17))
    cache = model.new_cache(1)
    model(rand_ids(1, 16), cache=cache)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=16"):
        model(rand_ids(1, 1), cache=cache)
    with pytest.raises(ValueError, match="leaves no room to generate"):
        generate(model, [list(range(1, 17))], SamplingParams(), EOS, PAD)
    # generation is capped by max_seq_len, not an error
    (s,) = generate(model, [list(range(1, 15))], SamplingParams(max_tokens=10), EOS, PAD,
                    generator=torch.Generator().manual_seed(0))
    assert len(s.tokens) <= 2


def test_generate_bad_prompts():
    model = tiny()
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, [], SamplingParams(), EOS, PAD)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], SamplingParams(), EOS, PAD)


@pytest.mark.parametrize("kwargs,match", [
    ({"d_model": 30, "n_head": 4}, "divisible by model.n_head"),
    ({"n_head": 4, "n_kv_head": 3}, "divisible by model.n_kv_head"),
    ({"d_model": 36, "n_head": 4}, "even"),
])
def test_gpt_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)
