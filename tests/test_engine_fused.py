"""The engine's fused weights (q|k|v and gate|up as single GEMMs) never go stale across weight changes.

The model runner keeps its own copies: W_qkv = [P·W_q; P·W_k; W_v] (P pair-interleaves the rows for its
complex RoPE) and W_gate_up = [W_gate; W_up], built from the model's parameters and rebuilt when a parameter's
version counter or storage changes (rlpt/engine/model_runner.py). In RL the weights change every step, so a
stale copy would be a silent bug: sampled log-probs that disagree with the trainer's. Each test changes the
weights the way training does (an optimizer step in place, `update_weights`, `load_state_dict`, a parameter
swapped for a new tensor), then checks the engine against the trainer's own forward of the new weights:
log-probs of sampled tokens to 1e-5 and greedy tokens equal to the naive loop's. The log-probs must also
differ from the old weights' (the change is visible, so a stale engine would fail the test).
"""
from __future__ import annotations

from functools import partial

import pytest
import torch

from rlpt.engine import LLM, SamplingParams
from rlpt.engine.naive import naive_greedy
from rlpt.framework.trajectory import per_token_logp

from conftest import TOK, tiny_gpt

EOS = TOK.eos_id
tiny = partial(tiny_gpt, std=0.3, n_head=4, n_kv_head=2, max_seq_len=32)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [3]]
SAMPLED = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=0, ignore_eos=True)


def engine_logps(llm: LLM) -> list[torch.Tensor]:
    """Each sample's recorded log-probs, and the trainer's for the same tokens (T = 1: the raw softmax)."""
    got, want = [], []
    for p, out in zip(PROMPTS, llm.generate(PROMPTS, SAMPLED)):
        for c in out.outputs:
            ids = torch.tensor([p + c.token_ids])
            with torch.no_grad():
                lp = per_token_logp(llm.model, ids)[0, len(p) - 1:]
            got.append(torch.tensor(c.token_logprobs))
            want.append(lp)
    return got, want


def assert_engine_matches_model(llm: LLM) -> list[torch.Tensor]:
    got, want = engine_logps(llm)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    for p, out in zip(PROMPTS, llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10))):
        assert out.outputs[0].token_ids == naive_greedy(llm.model, p, 10, eos_id=EOS)[0]
    return got


def fused_as_built_now(llm: LLM) -> None:
    """The runner's fused copies equal freshly concatenated current weights, exactly."""
    r = llm.runner
    hd, H, Hkv = r.hd, r.H, r.Hkv
    perm = lambda w, n: w.reshape(n, hd, -1)[:, r.perm].reshape(n * hd, -1)    # noqa: E731
    for i, layer in enumerate(r.served.layers):
        want = torch.cat([perm(layer.q.weight, H), perm(layer.k.weight, Hkv), layer.v.weight])
        assert torch.equal(r.w_qkv[i], want), f"layer {i}: stale q|k|v"
        assert torch.equal(r.w_gate_up[i], torch.cat([layer.gate.weight, layer.up.weight])), f"layer {i}: stale gate|up"


def sgd_step(model, lr: float) -> None:
    """θ ← θ − lr·∇θ in place, as an optimizer's step writes (torch.optim would import dynamo: seconds)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None


def changed(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(before, after) if a.shape == b.shape)


def test_fused_weights_follow_an_optimizer_step_in_place():
    model = tiny()
    llm = LLM(model, eos_id=EOS)
    before = assert_engine_matches_model(llm)
    per_token_logp(model, torch.tensor(PROMPTS[1] * 3)[None]).mean().backward()   # any loss moves every weight
    sgd_step(model, 0.5)
    fused_stale = llm.runner.w_qkv[0].clone()
    after = assert_engine_matches_model(llm)           # generate() refreshes on the version counters
    assert changed(before, after)
    assert not torch.equal(fused_stale, llm.runner.w_qkv[0])
    fused_as_built_now(llm)


def test_fused_weights_follow_update_weights_and_load_state_dict():
    model, other, third = tiny(seed=0), tiny(seed=1), tiny(seed=2)
    llm = LLM(model, eos_id=EOS)
    before = assert_engine_matches_model(llm)
    llm.update_weights(other.state_dict())             # a weight sync: copy_ into the served model
    fused_as_built_now(llm)
    after = assert_engine_matches_model(llm)
    assert changed(before, after)
    model.load_state_dict(third.state_dict())         # behind the engine's back: seen at the next generate
    third_logps = assert_engine_matches_model(llm)
    assert changed(after, third_logps)
    fused_as_built_now(llm)


def test_a_parameter_replaced_by_a_new_tensor_is_seen():
    model = tiny()
    llm = LLM(model, eos_id=EOS)
    before = assert_engine_matches_model(llm)
    mlp = model.layers[1].mlp
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.detach() * -1.5)    # new storage, version 0
    model.layers[0].attn.k_proj.weight.data = model.layers[0].attn.k_proj.weight.data.flip(0).clone()
    after = assert_engine_matches_model(llm)
    assert changed(before, after)
    fused_as_built_now(llm)


def test_refresh_rebuilds_once_per_change():
    model = tiny()
    llm = LLM(model, eos_id=EOS)
    r = llm.runner
    assert not r.refresh()                             # built at construction
    with torch.no_grad():
        model.layers[0].mlp.gate_proj.weight.mul_(1.01)
    assert r.refresh() and not r.refresh()
    fused_as_built_now(llm)


def test_hf_llama_fused_weights_follow_weight_syncs():
    pytest.importorskip("transformers")
    from rlpt.models.hf import gpt_mini_to_hf
    src, other = tiny(seed=3), tiny(seed=4)
    hf = gpt_mini_to_hf(src).eval()
    llm = LLM(hf, eos_id=EOS)

    def hf_logps() -> tuple[list, list]:
        got, want = [], []
        for p, out in zip(PROMPTS, llm.generate(PROMPTS, SAMPLED)):
            for c in out.outputs:
                with torch.no_grad():
                    logits = hf(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1:-1].float()
                want.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0])
                got.append(torch.tensor(c.token_logprobs))
        return got, want

    got0, want0 = hf_logps()
    for g, w in zip(got0, want0):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    llm.update_weights(gpt_mini_to_hf(other).state_dict())          # HF names
    fused_as_built_now(llm)
    got1, want1 = hf_logps()
    for g, w in zip(got1, want1):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    assert changed(got0, got1)
    hf(torch.tensor([PROMPTS[1]])).logits.logsumexp(-1).mean().backward()
    sgd_step(hf, 0.5)                                               # a trainer step on the HF model in place
    got2, want2 = hf_logps()
    for g, w in zip(got2, want2):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    assert changed(got1, got2)
    fused_as_built_now(llm)


def test_a_bf16_gpt_mini_is_served():
    """gpt_mini's RoPE buffers are cast with the model; the runner builds its rotation in fp32 from them
    (this crashed in torch.complex before). Its log-probs are the fp32 trainer's up to bf16 rounding."""
    model = tiny()
    p = PROMPTS[1]
    out = LLM(model.to(torch.bfloat16), eos_id=EOS).generate(
        [p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 6
    with torch.no_grad():
        want = per_token_logp(model.float(), torch.tensor([p + out.token_ids]))[0, len(p) - 1:]
    assert (torch.tensor(out.token_logprobs) - want).abs().max() < 0.1
