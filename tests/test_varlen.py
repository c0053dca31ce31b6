"""Varlen packing (rlpt.framework.varlen, issue 14): the flat layout is exact, each row's logits equal its own
forward's, and the trainer (which runs gpt_mini varlen) keeps the padded path's gradients, with and without
gradient checkpointing; a model without varlen support keeps pack_rows' bins."""
import copy

import pytest
import torch
from test_packing import grads_of, rollouts

import rlpt.algorithms  # noqa: F401 - registers the algorithms make_algorithm builds
from rlpt.framework.algorithm import make_algorithm
from rlpt.framework.trajectory import Packing, collate, pack_batch, per_token_logp
from rlpt.framework.varlen import Varlen, varlen_rows

from conftest import TOK, tiny_gpt

IDS = torch.tensor([[5, 6, 7, 8, 9, 0, 0],
                    [5, 6, 7, 10, 11, 12, 13],
                    [9, 9, 8, 1, 2, 0, 0],
                    [4, 0, 0, 0, 0, 0, 0],
                    [5, 6, 7, 14, 0, 0, 0]])
LENGTHS = torch.tensor([5, 7, 5, 1, 4])
PROMPTS = torch.tensor([3, 3, 2, 3, 3])


def test_layout_shares_each_prompt_once_and_drops_rows_that_predict_nothing():
    v = varlen_rows(IDS, LENGTHS, prefix_len=PROMPTS)
    # group (5, 6, 7): its prompt, then rows 0, 1, 4's own tokens; then group (9, 9) and row 2; row 3 (1 token) out
    assert v.input_ids.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 9, 9, 8, 1, 2]
    assert v.positions.tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 3, 0, 1, 2, 3, 4]
    assert v.gather.tolist() == [[0, 1, 2, 3, 4, 4, 4],          # past a row's end: its last token again
                                 [0, 1, 2, 5, 6, 7, 8],
                                 [0, 1, 2, 9, 9, 9, 9],
                                 [10, 11, 12, 13, 14, 14, 14]]
    assert v.rep.tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 17, 21, 22, 23, 24, 25]
    assert v.src.tolist() == [0, 1, 2, 3, 0, 1, 2, 5, 6, 7, 0, 1, 2, 10, 11, 12, 13]
    assert v.dst.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 24, 25, 26, 12, 13, 14, 15]
    assert v.targets.tolist() == [6, 7, 8, 9, 6, 7, 10, 11, 12, 13, 6, 7, 14, 9, 8, 1, 2]
    assert v.tokens == 15 < int(LENGTHS[LENGTHS > 1].sum()) and v.shape == (5, 6)
    # without prompts: every row's tokens once, no sharing
    assert varlen_rows(IDS, LENGTHS).tokens == 5 + 7 + 5 + 4


@pytest.mark.parametrize("shape", [{}, {"n_kv_head": 1}])
def test_each_rows_logits_equal_its_own_forward(shape):
    model = tiny_gpt(**shape).eval()
    prompts = PROMPTS.clone()
    prompts[4] = 6                     # longer than row 4: it shares the 3 tokens it has with rows 0 and 1
    v = varlen_rows(IDS, LENGTHS, prefix_len=prompts)
    logits = v.logits(model)
    assert logits.shape == (v.tokens, TOK.vocab_size)
    C = v.shape[1]
    for b in (0, 1, 2, 4):
        alone = model(IDS[b:b + 1, :int(LENGTHS[b])])[0, :-1]                          # (n-1, V)
        mine = v.dst // C == b
        assert mine.sum() == LENGTHS[b] - 1
        assert torch.allclose(logits[v.src[mine]], alone[v.dst[mine] % C], atol=1e-5), b
        assert v.targets[mine].tolist() == IDS[b, 1:int(LENGTHS[b])].tolist()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(v.input_ids, positions=v.positions, row_index=torch.zeros(1, 60, dtype=torch.long), token_slot=v.rep)
    with pytest.raises(ValueError, match="token_slot"):
        model(v.input_ids, positions=v.positions, row_index=v.gather)


def test_the_trainer_runs_gpt_mini_varlen_and_keeps_the_padded_gradients():
    policy, trajs = rollouts(seed=4)
    batch = collate(trajs, TOK.pad_id)
    assert isinstance(pack_batch(policy, batch.input_ids, batch.mask, batch.prompt_len), Varlen)
    loss_fn = make_algorithm({"name": "grpo", "beta": 0.0}, 4, 20).compute_loss
    ref, m_ref = grads_of(policy, batch, loss_fn)
    ckpt = copy.deepcopy(policy)
    ckpt.grad_checkpointing = True
    for model in (policy, ckpt):
        got, m = grads_of(model, batch, loss_fn, packing=True)
        assert m["loss"] == pytest.approx(m_ref["loss"], abs=1e-6)
        assert max((a - b).abs().max().item() for a, b in zip(got, ref)) <= 1e-6
    # the log-probs equal the padded forward's on every trained column
    v = pack_batch(policy, batch.input_ids, batch.mask, batch.prompt_len)
    with torch.no_grad():
        gap = (per_token_logp(policy, batch.input_ids, packed=v) - per_token_logp(policy, batch.input_ids)) * batch.mask
    assert gap.abs().max() <= 1e-5


class BinsOnly(torch.nn.Module):
    """gpt_mini with varlen support switched off: pack_batch falls back to pack_rows' bins."""
    supports_packing = True

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, **kw):
        return self.inner(input_ids, **kw)


def test_a_model_without_varlen_keeps_the_bins():
    policy, trajs = rollouts(seed=5)
    batch = collate(trajs, TOK.pad_id)
    bins = BinsOnly(policy)
    assert isinstance(pack_batch(bins, batch.input_ids, batch.mask, batch.prompt_len), Packing)
    loss_fn = make_algorithm({"name": "grpo", "beta": 0.0}, 4, 20).compute_loss
    ref, _ = grads_of(policy, batch, loss_fn)
    got, _ = grads_of(bins, batch, loss_fn, packing=True)
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) <= 1e-6


def test_the_matmul_attention_path_keeps_the_flash_paths_gradients(monkeypatch):
    """rlpt.gpt_mini.attention.MATH_MAX_T (off by default: it measured a tie, bench/attention.py): with it on, the
    trainer's varlen and padded forwards take causal_math, and the gradients stay the flash path's to 1e-6."""
    import rlpt.gpt_mini.attention as attn
    policy, trajs = rollouts(seed=4)
    batch = collate(trajs, TOK.pad_id)
    loss_fn = make_algorithm({"name": "grpo", "beta": 0.0}, 4, 20).compute_loss
    assert attn.MATH_MAX_T == 0
    flash, m_flash = grads_of(policy, batch, loss_fn, packing=True)
    calls = []
    monkeypatch.setattr(attn, "MATH_MAX_T", 64)
    monkeypatch.setattr(attn, "causal_math", lambda q, k, v, f=attn.causal_math: calls.append(q.shape) or f(q, k, v))
    for packing in (True, False):
        got, m = grads_of(policy, batch, loss_fn, packing=packing)
        assert m["loss"] == pytest.approx(m_flash["loss"], abs=1e-6)
        assert max((a - b).abs().max().item() for a, b in zip(got, flash)) <= 1e-6
    assert len(calls) >= 2 * policy.cfg.n_layer          # every layer of both forwards took the matmul path


def test_under_bf16_autocast_short_causal_rows_take_the_bf16_matmul_path(monkeypatch):
    """BF16_MATH_MAX_T (on: 64): under CPU bf16 autocast a causal row of <= 64 tokens runs causal_math in bf16 (the
    trainer step 1.07-1.10x faster than fp32 flash, bench/attention.py); its log-probs stay as close to fp32's as
    the fp32-attention path's, and with the knob at 0 attention runs in fp32 again."""
    import rlpt.gpt_mini.attention as attn
    from rlpt.framework.trainer import autocast
    policy, trajs = rollouts(seed=4)
    ids = collate(trajs, TOK.pad_id).input_ids
    seen = []
    monkeypatch.setattr(attn, "causal_math", lambda q, k, v, f=attn.causal_math: seen.append(
        torch.matmul(q, k.transpose(-1, -2)).dtype) or f(q, k, v))           # the dtype its matmuls run in
    with torch.no_grad():
        fp32 = per_token_logp(policy, ids)
        got = {}
        for knob in (64, 0):
            monkeypatch.setattr(attn, "BF16_MATH_MAX_T", knob)
            with autocast("bf16"):
                got[knob] = per_token_logp(policy, ids).float()
    assert attn.BF16_MATH_MAX_T == 0 and seen == [torch.bfloat16] * policy.cfg.n_layer    # knob 64 only
    gaps = {knob: (lp - fp32).abs().mean().item() for knob, lp in got.items()}
    assert 0 < gaps[64] <= 2 * gaps[0] + 1e-3 and gaps[0] <= 1e-2, gaps
