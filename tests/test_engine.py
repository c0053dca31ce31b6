"""rlpt.engine end to end: the paged, continuously batched engine against the naive decode loop.

Equivalence is token for token at temperature 0 (weights re-initialised with a large std so argmax
margins dwarf 1e-7 kernel noise), log-probs to 1e-5 against the trainer's `per_token_logp`, and
sampled outputs identical whatever else shares the batch or gets preempted. Every engine a test
builds is checked afterwards: refcounts equal holders, and once the prefix cache is dropped every
block is back on the free list.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch

from rlpt.engine import LLM, EngineBackend, SamplingParams
from rlpt.engine.naive import naive_greedy
from rlpt.engine.sampling import uniform
from rlpt.framework.trajectory import per_token_logp
from rlpt.gpt_mini.generate import SamplingParams as SimpleParams
from rlpt.gpt_mini.generate import generate as simple_generate
from rlpt.gpt_mini.generate import processed_logp

from conftest import TOK, tiny_gpt

EOS = TOK.eos_id


# the shared tiny GPT in GQA 4/2, weights redrawn with std 0.3 (peaked logits) unless told otherwise
tiny = partial(tiny_gpt, std=0.3, n_head=4, n_kv_head=2, max_seq_len=32)


def prompts(n=30, lo=1, hi=20, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(1, TOK.vocab_size, (L,), generator=g).tolist() for L in lens]


@pytest.fixture
def engine():
    made: list[LLM] = []

    def make(model, **kw) -> LLM:
        kw.setdefault("eos_id", EOS)
        llm = LLM(model, **kw)
        made.append(llm)
        return llm
    yield make
    for llm in made:
        llm.check_invariants()
        llm.reset_prefix_cache()
        assert llm.bm.num_free == llm.bm.num_blocks, "KV blocks leaked"


def checked_steps(llm: LLM) -> None:
    """Run the invariant check after every engine step (refcounts never drift or go negative)."""
    step = llm.step

    def wrapped():
        step()
        llm.bm.check([s.block_table for s in llm.scheduler.running])
    llm.step = wrapped


def assert_matches_naive(model, ps, outs, max_tokens, eos=EOS):
    for p, o in zip(ps, outs):
        ref, ref_lp = naive_greedy(model, p, max_tokens, eos_id=eos)
        got = o.outputs[0]
        assert got.token_ids == ref, f"prompt {p}"
        assert torch.allclose(torch.tensor(got.token_logprobs), torch.tensor(ref_lp), atol=1e-4)
        want_reason = "stop" if eos is not None and ref and ref[-1] == eos else "length"
        assert got.finish_reason == want_reason


@pytest.mark.parametrize("block_size,caching", [(16, True), (16, False), (4, True)])
def test_greedy_matches_naive_mixed_lengths(engine, block_size, caching):
    m = tiny()
    ps = prompts(40)
    llm = engine(m, block_size=block_size, enable_prefix_caching=caching)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=20))
    assert_matches_naive(m, ps, outs, 20)
    assert llm.metrics()["engine/preemptions"] == 0


def test_gather_decode_path_matches_naive(engine):
    """The decode path used off-CPU (gathered tiles + bmm instead of in-place sparse reads)."""
    m = tiny()
    ps = prompts(20)
    llm = engine(m, block_size=4)
    llm.runner.decode_in_place = False
    assert_matches_naive(m, ps, llm.generate(ps, SamplingParams(temperature=0, max_tokens=16)), 16)


@pytest.mark.parametrize("caching,num_blocks", [(True, 12), (False, 12), (True, 9)])
def test_greedy_matches_naive_under_memory_pressure(engine, caching, num_blocks):
    """12 blocks of 4 tokens (9: one full-length sequence + 1) for 30 sequences of up to 32 tokens, 6
    tokens per step: preemption by recompute and chunked prefill on almost every step, outputs unchanged."""
    m = tiny()
    ps = prompts(30)
    llm = engine(m, block_size=4, num_blocks=num_blocks, max_num_batched_tokens=6, enable_prefix_caching=caching)
    checked_steps(llm)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=20))
    assert_matches_naive(m, ps, outs, 20)
    mt = llm.metrics()
    assert mt["engine/preemptions"] > 5 and mt["tokens/recompute"] > 0 and mt["kv/blocks_peak"] == num_blocks


def test_chunked_prefill_keeps_decodes_running(engine):
    """A 28-token prompt arrives while 3 sequences decode; with 8 tokens per step it is prefilled in
    chunks of 5 over several steps, and the decodes still get a token on every one of them."""
    m = tiny()
    llm = engine(m, max_num_batched_tokens=8)
    short = [[1, 2], [3, 4, 5], [6]]
    long_prompt = prompts(1, 28, 29, seed=3)[0]
    orig, seen, late = llm.step, [], {}

    def step():
        if llm.stats["engine/steps"] == 2:                       # the long prompt arrives mid-flight
            late["req"] = llm._add_request(None, long_prompt, SamplingParams(temperature=0, max_tokens=3))
        decoding = {s: s.num_tokens for s in llm.scheduler.running if s.prompt_len < 10}
        req = late.get("req")
        prefilling = req is not None and req.seqs[0].num_computed < len(long_prompt)
        orig()
        seen.append((prefilling, all(s.num_tokens == n + 1 or s.is_finished for s, n in decoding.items())))
    llm.step = step
    outs = llm.generate(short, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert sum(p for p, _ in seen) >= 4 and all(ok for _, ok in seen)
    assert_matches_naive(m, short, outs, 12, eos=None)
    assert late["req"].seqs[0].output_ids == naive_greedy(m, long_prompt, 3, EOS)[0]


def test_logprobs_equal_trainer_logprobs(engine):
    m = tiny(std=0.08)
    ps = prompts(12)
    llm = engine(m, block_size=4)
    outs = llm.generate(ps, SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=5))
    for p, o in zip(ps, outs):
        assert len(o.outputs) == 3
        for c in o.outputs:
            ref = per_token_logp(m, torch.tensor([p + c.token_ids]))[0, len(p) - 1:]     # (R,)
            assert torch.allclose(torch.tensor(c.token_logprobs), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8),
                                dict(temperature=1.3, top_k=8, top_p=0.9)])
def test_logprobs_are_from_the_processed_distribution(engine, kw):
    m = tiny(std=0.08)
    ps = prompts(6)
    sp = SamplingParams(n=2, max_tokens=10, seed=3, logprobs=3, **kw)
    outs = engine(m).generate(ps, sp)
    for p, o in zip(ps, outs):
        for c in o.outputs:
            ids = torch.tensor([p + c.token_ids])
            with torch.no_grad():
                logp = processed_logp(m(ids)[0, len(p) - 1:-1], sp)                     # (R, V)
            lp = logp.gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(c.token_logprobs), lp, atol=1e-5)
            assert all(lp_i > float("-inf") for lp_i in c.token_logprobs)            # never a masked token
            assert len(c.logprobs) == len(c.token_ids) and all(t in d for t, d in zip(c.token_ids, c.logprobs))


def test_sampling_does_not_depend_on_batch_or_preemption(engine):
    m = tiny()
    target = [5, 6, 7]
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=20, seed=11)
    alone = engine(m).generate([target], sp)[0]
    crowd = prompts(20)
    for llm in (engine(m, max_num_batched_tokens=9), engine(m, block_size=4, num_blocks=12, max_num_batched_tokens=6)):
        outs = llm.generate(crowd[:10] + [target] + crowd[10:], [SamplingParams(temperature=1.0, max_tokens=20)] * 10
                            + [sp] + [SamplingParams(temperature=1.0, max_tokens=20)] * 10)
        assert [c.token_ids for c in outs[10].outputs] == [c.token_ids for c in alone.outputs]
    assert llm.metrics()["engine/preemptions"] > 0
    assert len({tuple(c.token_ids) for c in alone.outputs}) > 1          # the n samples differ


def test_n_samples_share_the_prompt(engine):
    """K = 16 samples: the prompt is computed once and its full blocks are held once; sharing (or
    losing it to preemption) does not change what is sampled."""
    m = tiny(max_seq_len=64)
    prompt = prompts(1, 40, 41, seed=4)[0]
    K, G, bs = 16, 8, 16
    sp = SamplingParams(n=K, temperature=1.0, max_tokens=G, seed=0, ignore_eos=True)
    shared = engine(m, block_size=bs, enable_prefix_caching=False)
    out = shared.generate([prompt], sp)[0]
    squeezed = engine(m, block_size=bs, num_blocks=6, enable_prefix_caching=False)
    assert [c.token_ids for c in squeezed.generate([prompt], sp)[0].outputs] == [c.token_ids for c in out.outputs]
    assert squeezed.metrics()["engine/preemptions"] > 0
    separate = engine(m, block_size=bs, enable_prefix_caching=False)
    separate.generate([prompt] * K, SamplingParams(temperature=1.0, max_tokens=G, ignore_eos=True))
    a, b = shared.metrics(), separate.metrics()
    assert a["tokens/prefill"] == len(prompt) and b["tokens/prefill"] == K * len(prompt)
    assert a["tokens/shared_by_fork"] == (K - 1) * len(prompt)
    full = len(prompt) // bs                                     # 2 full prompt blocks shared by all 16
    assert a["kv/blocks_peak"] <= full + K * (-(-(len(prompt) + G) // bs) - full)
    assert a["kv/blocks_peak"] < b["kv/blocks_peak"]


def test_prefix_cache_hits_across_requests_multi_turn(engine):
    m = tiny(max_seq_len=64)
    llm = engine(m, block_size=4)
    turn1 = prompts(1, 13, 14, seed=6)[0]
    out1 = llm.generate([turn1], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    turn2 = turn1 + out1.token_ids + [7, 8, 9]                   # the conversation goes on
    before = llm.metrics()["prefix_cache/hit_tokens"]
    out2 = llm.generate([turn2], SamplingParams(temperature=0, max_tokens=10))
    hit = llm.metrics()["prefix_cache/hit_tokens"] - before
    assert hit == len(turn1) + len(out1.token_ids) - 1           # every computed token, mid-block too
    assert_matches_naive(m, [turn2], out2, 10)
    assert llm.metrics()["prefix_cache/hit_rate"] > 0.5


def test_update_weights_changes_outputs_and_bumps_version(engine):
    m, other = tiny(seed=0), tiny(seed=1)
    ps = prompts(8)
    llm = engine(m)
    sp = SamplingParams(temperature=0, max_tokens=12)
    before = [o.outputs[0].token_ids for o in llm.generate(ps, sp)]
    assert llm.update_weights(other.state_dict()) == 1 and llm.version == 1
    assert llm.metrics()["prefix_cache/tokens"] == 0             # old K/V dropped
    after = llm.generate(ps, sp)
    assert [o.outputs[0].token_ids for o in after] != before
    assert_matches_naive(other, ps, after, 12)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), other.state_dict().values()))


def test_weights_changed_outside_the_engine_are_picked_up(engine):
    m, other = tiny(seed=0), tiny(seed=1)
    llm = engine(m)
    sp = SamplingParams(temperature=0, max_tokens=12)
    llm.generate(prompts(4), sp)
    with torch.no_grad():
        for p, q in zip(m.parameters(), other.parameters()):
            p.copy_(q)                                           # what WeightSyncer.copy_weights does
    assert_matches_naive(other, prompts(4), llm.generate(prompts(4), sp), 12)


BAD_PARAMS = [(dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"), (dict(top_p=0.0), "top_p"),
              (dict(top_p=1.5), "top_p"), (dict(temperature=-1.0), "temperature"), (dict(n=0), "n"),
              (dict(top_k=-2), "top_k")]


@pytest.mark.parametrize("kw,field", BAD_PARAMS)
def test_bad_sampling_params_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kw)


def test_bad_inputs_are_clear_errors_and_leave_the_engine_usable(engine):
    m = tiny()
    llm = engine(m)
    sp = SamplingParams(temperature=0, max_tokens=5)
    cases = [([], "non-empty list"), ([[1, 2], []], "prompt 1 is empty"), ([[1] * 32], "prompt 0 has 32 tokens"),
             ([[1, 2, 99]], r"token ids \[99\]"), (["3+4"], "no tokenizer")]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            llm.generate(bad, sp)
    sd = m.state_dict()
    missing = {k: v for k, v in sd.items() if k != "layers.0.mlp.up_proj.weight"}
    shaped = dict(sd, **{"layers.1.attn.q_proj.weight": torch.zeros(3, 3)})
    extra = dict(sd, **{"layers.9.attn.q_proj.weight": torch.zeros(3, 3)})
    for bad, msg in [(missing, r"missing \['layers.0.mlp.up_proj.weight'\]"),
                     (shaped, r"layers.1.attn.q_proj.weight: expected \(32, 32\), got \(3, 3\)"),
                     (extra, r"unexpected \['layers.9.attn.q_proj.weight'\]")]:
        with pytest.raises(ValueError, match=msg):
            llm.update_weights(bad)
    assert llm.version == 0 and torch.equal(m.layers[0].mlp.up_proj.weight, sd["layers.0.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match="num_blocks=2 cannot hold"):
        LLM(m, num_blocks=2)
    ps = prompts(5)
    assert_matches_naive(m, ps, llm.generate(ps, sp), 5)          # still works, nothing leaked (fixture)


def test_exception_mid_generate_releases_everything(engine):
    m = tiny()
    llm = engine(m, block_size=4)
    forward, calls = llm.runner.forward, [0]

    def flaky(fb):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt("simulated")
        return forward(fb)
    llm.runner.forward = flaky
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts(10), SamplingParams(n=2, temperature=1.0, max_tokens=10))
    llm.check_invariants()
    ps = prompts(3)
    assert_matches_naive(m, ps, llm.generate(ps, SamplingParams(temperature=0, max_tokens=8)), 8)


def test_strings_stop_strings_and_stop_tokens(engine):
    m = tiny()
    llm = engine(m, tokenizer=TOK)
    text = "<3+4>"
    greedy = llm.generate(text, SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))[0].outputs[0]
    assert greedy.text == TOK.decode(greedy.token_ids) and greedy.finish_reason == "length"
    stop_tok = greedy.token_ids[4]
    cut = llm.generate([text], SamplingParams(temperature=0, max_tokens=15, ignore_eos=True,
                                              stop_token_ids=[stop_tok]))[0].outputs[0]
    first = greedy.token_ids.index(stop_tok)
    assert cut.token_ids == greedy.token_ids[:first + 1] and cut.finish_reason == "stop" and cut.stop_reason == stop_tok
    s = TOK.decode(greedy.token_ids[5:7])
    out = llm.generate([text], SamplingParams(temperature=0, max_tokens=15, ignore_eos=True, stop=[s]))[0].outputs[0]
    full = TOK.decode(greedy.token_ids)
    assert out.text == full[:full.index(s)] and out.finish_reason == "stop" and out.stop_reason == s


def test_rollout_backend_matches_the_simple_sampler(engine):
    m = tiny()
    backend = EngineBackend(block_size=4)
    ps = prompts(10, 1, 12)
    greedy = SimpleParams(max_tokens=12, temperature=0.0)
    want = simple_generate(m, ps, greedy, EOS, TOK.pad_id)
    got = backend(m, ps, greedy, EOS, TOK.pad_id)
    assert [s.tokens for s in got] == [s.tokens for s in want]
    assert [s.finish_reason for s in got] == [s.finish_reason for s in want]
    for a, b in zip(got, want):
        assert torch.allclose(torch.tensor(a.logps), torch.tensor(b.logps), atol=1e-5)
    group = [ps[0]] * 8 + [ps[1]] * 8                            # two GRPO groups of K = 8
    s1 = backend(m, group, SimpleParams(max_tokens=12), EOS, TOK.pad_id, torch.Generator().manual_seed(3))
    s2 = backend(m, group, SimpleParams(max_tokens=12), EOS, TOK.pad_id, torch.Generator().manual_seed(3))
    assert [s.tokens for s in s1] == [s.tokens for s in s2]      # reproducible from the generator
    llm = backend.engine(m)
    assert llm.metrics()["tokens/shared_by_fork"] > 0
    for p, s in zip(group, s1):
        ref = per_token_logp(m, torch.tensor([p + s.tokens]))[0, len(p) - 1:]
        assert torch.allclose(torch.tensor(s.logps), ref, atol=1e-5)
    llm.check_invariants()
    llm.reset_prefix_cache()
    assert llm.bm.num_free == llm.bm.num_blocks
    with pytest.raises(ValueError, match="at least one token"):
        backend(m, [[1], []], greedy, EOS, TOK.pad_id)


def test_counter_rng_is_uniform_and_independent():
    seeds = torch.arange(200).repeat_interleave(100)
    idx = torch.arange(100).repeat(200)
    u = uniform(seeds, idx, 0)
    assert u.min() >= 0 and u.max() < 1
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    chi2 = ((counts - 1000) ** 2 / 1000).sum()
    assert chi2 < 45                                             # 19 dof: p ≈ 7e-4
    v = uniform(seeds, idx, 1)
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1]) < 0.03   # streams independent
    assert torch.equal(u, uniform(seeds, idx, 0))                # a pure function of its coordinates
