"""Operand-index embeddings (model.operand_index, rlpt.gpt_mini.model) and NoPE (model.rope=false): the indices
by hand, every forward path (KV-cache decode, packed rows, shared-prefix branches, varlen, the paged engine,
speculative decoding) equal to the plain forward with and without rotary positions, the embedding read at exactly
those indices, SFT's random offset (resumed bit-identically) and the errors for what cannot hold them."""
from __future__ import annotations

import pytest
import torch
from test_sft import _assert_same, _interrupt_at

from rlpt import sft
from rlpt.config import ModelConfig, load_config
from rlpt.engine.llm import LLM
from rlpt.engine.sampling import SamplingParams
from rlpt.framework.varlen import varlen_rows
from rlpt.gpt_mini.model import GPT, GPTConfig, load_model
from rlpt.gpt_mini.operand_index import operand_index, operand_index_list
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.models.hf import gpt_mini_to_hf
from rlpt.sft import SFTJob

TOK = CharTokenizer()
TEXT = "<3+4+5>3+4=7,7+5=12#"


def _model(seed: int = 0, rope: bool = True) -> GPT:
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=TOK.vocab_size, n_layer=2, d_model=32, n_head=2, n_kv_head=2, d_ff=64,
                      rope_theta=1e30, rope=rope, operand_index=8)).eval()
    with torch.no_grad():   # large rows, so a wrong index would move the logits far past rounding
        m.operand_embed.weight.normal_(0, 1)
        m.segment_embed.weight.normal_(0, 1)
    return m


def _ids(text: str) -> torch.Tensor:
    return torch.tensor([TOK.encode(text)])


def test_indices_by_hand():
    index, resp, state = operand_index(_ids(TEXT))
    # prompt: '+' counted up to each token; response: the step adding operand i carries i, its sum too
    assert index[0].tolist() == [0, 0, 1, 1, 2, 2, 2] + [0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert resp[0].tolist() == [False] * 7 + [True] * 13
    assert state.tolist() == [[1, 2, 2]]
    assert operand_index_list(TOK.encode(TEXT)) == (index[0].tolist(), resp[0].long().tolist())
    # carried state: the second half of a sequence gets the same indices as in one piece
    i1, r1, s1 = operand_index(_ids(TEXT[:9]))
    i2, r2, _ = operand_index(_ids(TEXT[9:]), state=s1)
    assert torch.cat([i1, i2], 1).equal(index) and torch.cat([r1, r2], 1).equal(resp)


@pytest.mark.parametrize("rope", [True, False])
@torch.no_grad()
def test_every_forward_path_equals_the_plain_forward(rope):
    m = _model(rope=rope)
    full = m(_ids(TEXT))
    cache = m.new_cache(1)                                                   # decode in chunks
    parts = [m(_ids(TEXT[:9]), cache=cache)] + [m(_ids(c), cache=cache) for c in TEXT[9:]]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    other = "<1+2>1+2=3#"                                                    # packed: two sequences in one row
    row = _ids(TEXT + other)
    seg = torch.tensor([[0] * len(TEXT) + [1] * len(other)])
    pos = torch.tensor([list(range(len(TEXT))) + list(range(len(other)))])
    out = m(row, positions=pos, segment_ids=seg)
    torch.testing.assert_close(out[:, :len(TEXT)], full, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, len(TEXT):], m(_ids(other)), atol=1e-5, rtol=0)
    p, r1, r2 = "<3+4+5>", "3+4=7,7+5=12#", "3+4=7#"                        # one prompt, two branches
    row = _ids(p + r1 + r2)
    br = torch.tensor([[0] * len(p) + [1] * len(r1) + [2] * len(r2)])
    pos = torch.tensor([list(range(len(p) + len(r1))) + list(range(len(p), len(p) + len(r2)))])
    out = m(row, positions=pos, segment_ids=torch.zeros_like(row), branch_ids=br)
    torch.testing.assert_close(out[:, :len(p + r1)], full, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, len(p + r1):], m(_ids(p + r2))[:, len(p):], atol=1e-5, rtol=0)
    texts = [TEXT, other, "<3+4+5>3+4=7#"]                                   # varlen, rows 0 and 2 share the prompt
    batch = torch.full((3, len(TEXT)), TOK.pad_id)
    for b, t in enumerate(texts):
        batch[b, :len(t)] = _ids(t)[0]
    v = varlen_rows(batch, torch.tensor([len(t) for t in texts]), prefix_len=torch.tensor([7, 5, 7]))
    logits = m(v.input_ids, positions=v.positions, row_index=v.gather, token_slot=v.rep)
    grid = logits.new_zeros(3 * (len(TEXT) - 1), logits.shape[-1])
    grid[v.dst] = logits[v.src]
    grid = grid.view(3, len(TEXT) - 1, -1)
    for b, t in enumerate(texts):
        torch.testing.assert_close(grid[b, :len(t) - 1], m(_ids(t))[0, :-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("draft,rope", [(False, True), (True, True), (False, False)])
@torch.no_grad()
def test_the_engine_samples_from_the_plain_forwards_distribution(draft, rope):
    m = _model(rope=rope)
    llm = LLM(m, num_blocks=64, block_size=8, draft_model=_model(1) if draft else None)
    prompts = [TOK.encode(p) for p in ("<3+4+5>", "<1+2+3+4+5+6>", "<9+9>")]
    outs = llm.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=24, seed=3, ignore_eos=True))
    assert llm.stats["engine/steps"] > 0
    for p, o in zip(prompts, outs):
        for c in o.outputs:
            logp = m(torch.tensor([p + c.token_ids]))[0, len(p) - 1:-1].log_softmax(-1)
            want = logp.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.token_logprobs), want, atol=1e-5, rtol=0)


@torch.no_grad()
def test_the_embedding_is_read_at_exactly_those_indices():
    m = _model()
    short, long = _ids("<1+2>1+2=3#"), _ids("<1+2+3+4+5>1+2=3#")          # indices 0-1 and 0-4
    before = m(short), m(long)
    m.operand_embed.weight[4] += 5.0
    torch.testing.assert_close(m(short), before[0], atol=0, rtol=0)          # never reads row 4
    assert not torch.allclose(m(long), before[1], atol=1e-2)                 # its fifth operand does
    ten = _ids("<" + "+".join("1" * 10) + ">")                                # indices 0-9 with 8 rows:
    index, resp, _ = operand_index(ten)                                      # 8 and 9 share the last row, 7
    assert index.max() == 9
    rows = m._operand_embedding(index, resp)[0]
    assert torch.equal(rows[-1], rows[index[0].tolist().index(7)])


def test_sft_offset_resumes_bit_identically(tiny_job, monkeypatch):
    over = ["model.operand_index=8", "sft.operand_offset=4", "sft.steps=8", "sft.ckpt_every=4",
            "sft.keep_checkpoints=10"]
    model_a, run_a, final_a = sft.train_sft(tiny_job(*over, "run.name=straight"))
    job = tiny_job(*over, "run.name=crashed")
    _interrupt_at(monkeypatch, 6, "crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        sft.train_sft(job)
    monkeypatch.undo()
    model_b, run_b, final_b = sft.train_sft(job, resume=True)
    _assert_same(model_a, model_b)
    assert final_a == final_b
    plain, _, _ = sft.train_sft(tiny_job("model.operand_index=8", "sft.steps=8", "run.name=no_offset"))
    assert not torch.equal(plain.operand_embed.weight, model_a.operand_embed.weight)   # the offset drew other rows


def test_bad_settings_and_exports_are_refused(tmp_path):
    with pytest.raises(Exception, match="sft.operand_offset=2 shifts operand-index embeddings, but model.operand_"):
        load_config(SFTJob, None, ["sft.operand_offset=2"])
    with pytest.raises(Exception, match=r"reaches operand index 11, past model.operand_index=8 rows: set model.op"
                                        r"erand_index >= 12"):
        load_config(SFTJob, None, ["model.operand_index=8", "sft.operand_offset=8"])
    with pytest.raises(ValueError, match=r"model.operand_index=8\), which a Llama has no place for"):
        gpt_mini_to_hf(_model())
    with pytest.raises(ValueError, match=r"no rotary positions \(model.rope=false\), which a Llama always applies"):
        gpt_mini_to_hf(_model(rope=False))
    # a checkpoint written before the key existed loads under the default config (operand_index 0)
    from rlpt.checkpoint import read_checkpoint_meta, save_checkpoint
    plain = GPT(GPTConfig(vocab_size=TOK.vocab_size))
    meta = plain.cfg.to_dict()
    del meta["operand_index"], meta["rope"]
    save_checkpoint(tmp_path / "old", plain, meta, {})
    assert "operand_index" not in read_checkpoint_meta(tmp_path / "old")
    old = load_model(tmp_path / "old", ModelConfig(), TOK)
    assert old.cfg.operand_index == 0 and old.cfg.rope


def test_rlpt_export_refuses_such_a_run_cleanly(tiny_job, tmp_path, capsys):
    from rlpt.cli import main
    _, run, _ = sft.train_sft(tiny_job("model.rope=false", "model.operand_index=8", "sft.steps=2", "run.name=nope"))
    assert main(["export", str(run.dir), str(tmp_path / "hf")]) != 0
    err = capsys.readouterr().err
    assert "no rotary positions (model.rope=false)" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()                                   # nothing written

