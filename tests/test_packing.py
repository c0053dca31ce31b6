"""Sequence packing and bf16 autocast in the trainer (issue 14, lesson 22b): the packed forward equals the padded
one row by row, the trainer's gradients on sampled rollouts equal the padded path's to 1e-6 (fp32), the reference
and DPO give the same numbers packed, and bf16 keeps fp32 master weights with a bounded log-prob gap."""
import copy
import shutil

import pytest
import torch

import rlpt.algorithms  # noqa: F401 - registers the algorithms make_algorithm builds
from rlpt.framework.algorithm import make_algorithm
from rlpt.framework.reference import Reference
from rlpt.framework.rollout import Rollout
from rlpt.framework.trainer import Trainer, bf16_path
from rlpt.framework.trajectory import collate, pack_rows, trained_lengths
from rlpt.gpt_mini.generate import SamplingParams
from rlpt.gpt_mini.task import ArithmeticTask
from rlpt.preference.data import PreferencePair, collate_pairs
from rlpt.preference.dpo import DPOConfig, make_reference, preference_loss

from conftest import TOK, ParityEnv, tiny_gpt


def rollouts(k=4, prompts=6, max_tokens=20, seed=0, shift=0.01):
    """Trajectories sampled by a random tiny policy: lengths as sampled (EOS anywhere), mixed rewards."""
    torch.manual_seed(seed)
    policy = tiny_gpt()
    env = ParityEnv(ArithmeticTask(max_operands=3), seed=seed, tokenizer=TOK)
    rollout = Rollout(copy.deepcopy(policy), TOK, prompts, SamplingParams(max_tokens=max_tokens), seed=seed)
    trajs = [t for g in rollout.generate(env, k) for t in g]
    for i, t in enumerate(trajs):   # non-zero advantages, and an old_logp off the policy's so the ratio moves
        t.advantage = (i % 5) - 2.0
        t.old_logp = t.old_logp + shift * t.response_mask
    return policy, trajs


def trainer(policy, **kw):
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    return Trainer(policy, opt, None, 1.0, **kw)


# -- the model: packed rows = each row on its own ------------------------------------------------------
def test_packed_forward_equals_each_row_alone():
    torch.manual_seed(0)
    model = tiny_gpt().eval()
    rows = [torch.randint(1, TOK.vocab_size, (n,)) for n in (9, 4, 13, 2, 7)]
    ids = torch.zeros(len(rows), 13, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
    p = pack_rows(ids, torch.tensor([len(r) for r in rows]), capacity=16)
    logits = model(p.input_ids, positions=p.positions, segment_ids=p.segment_ids)   # (b, 16, V)
    for b, r in enumerate(rows):
        alone = model(r[None])[0]                                                   # (n, V)
        assert torch.allclose(logits[p.segment_ids == b], alone, atol=1e-5), b
    assert p.tokens == sum(len(r) for r in rows) and (p.segment_ids >= 0).sum() == p.tokens


def test_pack_rows_first_fit_decreasing_layout():
    ids = torch.arange(1, 41).view(4, 10)
    p = pack_rows(ids, torch.tensor([6, 10, 4, 3]), capacity=10)
    # decreasing: row 1 (10) fills packed row 0; row 0 (6) opens packed row 1, row 2 (4) joins it; row 3 opens row 2
    assert p.segment_ids.tolist() == [[1] * 10, [0] * 6 + [2] * 4, [3] * 3 + [-1] * 7]
    assert p.positions.tolist() == [list(range(10)), [0, 1, 2, 3, 4, 5, 0, 1, 2, 3], [0, 1, 2] + [0] * 7]
    assert p.input_ids[1].tolist() == [1, 2, 3, 4, 5, 6, 21, 22, 23, 24]
    assert p.input_ids[2, 3:].tolist() == [0] * 7                                   # pad_id after the last row
    # one target per token that has a next one: 9 + 5 + 3 + 2
    assert len(p.src) == 19 and p.shape == (4, 9)
    assert p.targets[:5].tolist() == ids[0, 1:6].tolist()              # in row order: row 0's targets first
    assert p.src[:5].tolist() == [10, 11, 12, 13, 14] and p.dst[:5].tolist() == [0, 1, 2, 3, 4]


def test_shared_prompt_layout_and_logits_equal_each_row_alone():
    torch.manual_seed(0)
    model = tiny_gpt().eval()
    prompt = [5, 6, 7]
    tails = [[8, 9], [10, 11, 12, 13], [14], [15, 16, 17]]
    ids = torch.zeros(5, 8, dtype=torch.long)
    for b, t in enumerate(tails):
        ids[b, :3 + len(t)] = torch.tensor(prompt + t)
    ids[4, :5] = torch.tensor([9, 9, 8, 1, 2])                # another prompt: a unit of its own
    lengths = torch.tensor([5, 7, 4, 6, 5])
    p = pack_rows(ids, lengths, capacity=12, prefix_len=torch.tensor([3, 3, 3, 3, 2]))
    # prompt group: tails 4, 3, 2, 1 fill units of 12 - 3 = 9 tokens decreasing: {row 1, row 3, row 0}, {row 2};
    # a unit lays its rows out in row order
    assert p.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 17]
    assert p.positions[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 3, 4, 5]
    assert p.branch_ids[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 4, 4, 4]
    assert p.tokens == 12 + 4 + 5 < int(lengths.sum())       # the prompt stored twice, not four times
    logits = model(p.input_ids, positions=p.positions, segment_ids=p.segment_ids, branch_ids=p.branch_ids)
    flat = logits.reshape(-1, logits.shape[-1])
    for b in range(5):
        alone = model(ids[b:b + 1, :int(lengths[b])])[0, :-1]                        # (n-1, V)
        mine = p.dst // 7 == b
        assert torch.allclose(flat[p.src[mine]], alone[p.dst[mine] % 7], atol=1e-5), b
        assert p.targets[mine].tolist() == ids[b, 1:int(lengths[b])].tolist()


def test_trained_lengths_stop_at_the_last_target():
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0.]])
    assert trained_lengths(mask).tolist() == [5, 7, 0]


def test_packed_forward_needs_positions_within_the_model():
    model = tiny_gpt()
    ids = torch.ones(1, 60, dtype=torch.long)                 # longer than max_seq_len 48: fine when packed
    ok = model(ids, positions=torch.arange(60).remainder(30)[None], segment_ids=(torch.arange(60) // 30)[None])
    assert ok.shape == (1, 60, TOK.vocab_size)
    with pytest.raises(ValueError, match="max_seq_len=48"):
        model(ids, positions=torch.arange(60)[None], segment_ids=torch.zeros(1, 60, dtype=torch.long))
    with pytest.raises(ValueError, match="positions and segment_ids"):
        model(ids, segment_ids=torch.zeros(1, 60, dtype=torch.long))


# -- the trainer: same gradients, less padding ---------------------------------------------------------
def grads_of(policy, batch, loss_fn, **kw):
    tr = trainer(copy.deepcopy(policy), **kw)
    m = tr.accumulate_grads(batch, loss_fn, check={})
    return [p.grad.clone() for p in tr.model.parameters()], m


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_packed_gradients_equal_padded_on_sampled_rollouts(agg):
    policy, trajs = rollouts()
    lens = {len(t.prompt_ids) + len(t.response_ids) for t in trajs}
    assert len(lens) > 3                                      # lengths as sampled, not one padded shape
    batch = collate(trajs, TOK.pad_id)
    loss_fn = make_algorithm({"name": "grpo", "loss_agg": agg, "beta": 0.0}, 4, 20).compute_loss
    ref, m_ref = grads_of(policy, batch, loss_fn)
    for mbs in (0, 5):
        got, m = grads_of(policy, batch, loss_fn, micro_batch_size=mbs, packing=True)
        assert m["loss"] == pytest.approx(m_ref["loss"], abs=1e-6)
        assert max((a - b).abs().max().item() for a, b in zip(got, ref)) <= 1e-6
        assert m["policy/entropy"] == pytest.approx(m_ref["policy/entropy"], abs=1e-6)
    assert trainer(copy.deepcopy(policy), packing=True).packs


class NoPacking(torch.nn.Module):
    """A policy whose forward takes only input_ids (as an HF model here): the trainer buckets by length instead."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner(input_ids)


def test_length_bucketed_chunks_where_packing_does_not_apply():
    policy, trajs = rollouts(seed=1)
    batch = collate(trajs, TOK.pad_id)
    loss_fn = make_algorithm({"name": "grpo", "beta": 0.0}, 4, 20).compute_loss
    wrapped = NoPacking(policy)
    ref, m_ref = grads_of(wrapped, batch, loss_fn, micro_batch_size=5)
    tr = trainer(copy.deepcopy(wrapped), micro_batch_size=5, packing=True)
    assert not tr.packs
    chunks = tr._chunks(batch)
    need = trained_lengths(batch.mask)
    assert sum(c.size for c in chunks) == batch.size
    assert all(c.input_ids.shape[1] == int(trained_lengths(c.mask).max()) for c in chunks)   # cut to its longest
    assert sum(c.input_ids.numel() for c in chunks) < batch.input_ids.numel()
    assert int(need.max()) == chunks[0].input_ids.shape[1]
    got, m = grads_of(wrapped, batch, loss_fn, micro_batch_size=5, packing=True)
    assert m["loss"] == pytest.approx(m_ref["loss"], abs=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) <= 1e-6


def test_reference_scores_the_same_packed():
    policy, trajs = rollouts(seed=2)
    a, b = copy.deepcopy(trajs), copy.deepcopy(trajs)
    Reference(policy).score(a, TOK.pad_id)
    Reference(policy, packing=True).score(b, TOK.pad_id)
    for x, y in zip(a, b):
        assert torch.allclose(x.ref_logp, y.ref_logp, atol=1e-6)
        assert (x.ref_logp != 0).any() or not x.response_mask.any()


def test_dpo_packed_loss_and_gradients_equal_padded():
    torch.manual_seed(0)
    policy = tiny_gpt()
    pairs = [PreferencePair("1+2=", "3#", "4#"), PreferencePair("12+30+4=", "12+30=42,42+4=46#", "47#"),
             PreferencePair("5*6=", "30#", "31#")]
    batch = collate_pairs(pairs, TOK)
    reference = make_reference(policy, "dpo")
    with torch.no_grad():   # a policy that has moved away from its reference: Δ ≠ 0, a loss other than log 2
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = []
    for packing in (False, True):
        model = copy.deepcopy(policy)
        cfg = DPOConfig(method="dpo", packing=packing)
        loss, m = preference_loss(cfg, model, reference, batch, TOK.pad_id)
        loss.backward()
        out.append((loss.item(), m["logp/chosen"].item(), [p.grad for p in model.parameters()]))
    assert abs(out[0][0] - 0.6931) > 1e-3                     # not the trivial Δ = 0
    assert out[1][0] == pytest.approx(out[0][0], abs=1e-6) and out[1][1] == pytest.approx(out[0][1], abs=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(out[0][2], out[1][2])) <= 1e-6


# -- bf16 autocast ---------------------------------------------------------------------------------------
def test_bf16_keeps_fp32_master_weights_and_a_small_logp_gap():
    policy, trajs = rollouts(seed=3, shift=0.0)
    batch = collate(trajs, TOK.pad_id)
    loss_fn = make_algorithm({"name": "grpo", "beta": 0.0}, 4, 20).compute_loss
    tr32, tr16 = trainer(copy.deepcopy(policy)), trainer(copy.deepcopy(policy), precision="bf16", packing=True)
    lp32 = tr32._forward(batch)[0]
    lp16 = tr16._forward(batch)[0]
    assert lp16.dtype == torch.float32
    gap = ((lp16 - lp32).abs() * batch.mask).sum() / batch.mask.sum()
    assert 0 < gap < 1e-2                                     # bf16 rounding, not a bug-sized gap
    m = tr16.train_step(batch, loss_fn)
    assert all(p.dtype == torch.float32 for p in tr16.model.parameters())
    assert all(v.dtype == torch.float32 for s in tr16.opt.state.values() for v in s.values() if v.dim())
    assert m["check/logp_mismatch_mean"] == pytest.approx(gap.item(), rel=1e-2)   # the check sees the bf16 gap
    assert m["trainer/bf16_native"] == float(bf16_path() != "emulated")
    with pytest.raises(ValueError, match="fp32 or bf16"):
        trainer(copy.deepcopy(policy), precision="fp16")


@pytest.mark.slow
def test_packed_bf16_run_passes_the_check_and_resumes_bit_identically(tiny_train_job):
    on = ("trainer.packing=true", "trainer.precision=bf16", "trainer.mini_batches=2", "trainer.micro_batch_size=6")
    from rlpt.train import run_train
    ctl_a, run_a, _ = run_train(tiny_train_job(*on, "run.name=straight", "steps=4", "ckpt_every=2"))
    assert ctl_a.trainer.packs and ctl_a.reference.packing and ctl_a.logp_tol == 1e-2
    broken = tiny_train_job(*on, "run.name=resumed", "steps=4", "ckpt_every=2", f"init_from={run_a.dir / 'sft'}")
    ctl_b, run_b, _ = run_train(broken)
    shutil.rmtree(run_b.dir / "checkpoints" / "step_00000004")
    (run_b.dir / "checkpoints" / "latest").write_text("step_00000002")
    ctl_b, run_b, _ = run_train(broken, resume=True)
    for (k, a), b in zip(ctl_a.trainer.model.state_dict().items(), ctl_b.trainer.model.state_dict().values()):
        assert torch.equal(a, b), k
    rows = [r for r in run_a.read_metrics() if "check/logp_mismatch_mean" in r]
    assert rows and all(0 < r["check/logp_mismatch_mean"] < 1e-2 for r in rows)
