"""trainer.grad_checkpointing: gpt_mini (torch.utils.checkpoint per block) and HF policies (their own per-layer
checkpointing), full and LoRA. Checked: gradients equal to the plain path's (<= 1e-6), each block really runs
twice (forward, then recomputed in backward), the tensors saved for backward shrink, nothing changes without
grad or in eval mode. The peak-memory cut is measured by bench/memory.py, not here."""
from __future__ import annotations

import copy

import pytest
import torch

from rlpt.framework.trajectory import pack_rows, per_token_logp
from rlpt.hf_policy import set_grad_checkpointing

from conftest import TOK, tiny_gpt

IDS = torch.tensor([TOK.encode("<12+7+9>28#(1+2)*3=9#"), TOK.encode("(1+2)*3=9#x<4+4>8#777")])   # (2, 21)


def _grads(model, ids=IDS, **fwd) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    logp = per_token_logp(model, ids, 0.7, **fwd)
    (-(logp * torch.linspace(-1, 1, logp.shape[1])).sum()).backward()     # any loss that weighs every token
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_equal_grads(plain, ckpt):
    (lp, gp), (lc, gc) = plain, ckpt
    assert gp.keys() == gc.keys() and gp
    torch.testing.assert_close(lc, lp, atol=1e-6, rtol=0)
    for name in gp:
        torch.testing.assert_close(gc[name], gp[name], atol=1e-6, rtol=0, msg=name)


def _saved_bytes(model, ids=IDS) -> int:
    """Bytes of the tensors autograd keeps for backward at the end of the forward (unique storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        per_token_logp(model, ids, 0.7).sum()
    return sum(seen.values())


def _count_block_calls(model, blocks) -> list[int]:
    calls = [0]     # pre-hooks: the recompute stops early, once it has what backward needs
    hooks = [b.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for b in blocks]
    _grads(model)
    for h in hooks:
        h.remove()
    return calls


def test_gpt_mini_checkpointed_gradients_equal_the_plain_ones():
    model = tiny_gpt(seed=3, std=0.2)
    plain = _grads(model)
    set_grad_checkpointing(model)
    assert model.grad_checkpointing and not type(model).grad_checkpointing    # on this instance only
    _assert_equal_grads(plain, _grads(model))
    assert _count_block_calls(model, model.layers) == [2 * len(model.layers)]   # forward + recompute
    set_grad_checkpointing(model, False)
    assert _count_block_calls(model, model.layers) == [len(model.layers)]


def test_gpt_mini_packed_rows_checkpointed_equal_the_plain_ones():
    model = tiny_gpt(seed=4, std=0.2)
    packed = pack_rows(IDS, torch.tensor([20, 15]))
    plain = _grads(model, packed=packed)
    set_grad_checkpointing(model)
    _assert_equal_grads(plain, _grads(model, packed=packed))


def test_gpt_mini_checkpointing_keeps_fewer_tensors_for_backward():
    model = tiny_gpt(seed=0, n_layer=4)
    plain = _saved_bytes(model)
    set_grad_checkpointing(model)
    ckpt = _saved_bytes(model)
    assert ckpt < 0.5 * plain, (ckpt, plain)        # each block keeps its input only (d floats per token)


def test_gpt_mini_checkpointing_is_off_without_grad_in_eval_and_with_a_cache():
    model = tiny_gpt(seed=0)
    set_grad_checkpointing(model)
    model.eval()
    with torch.no_grad():
        full = model(IDS)
    assert _saved_bytes(model.eval()) > 0                       # eval mode + grad: the plain path (no recompute)
    cache = model.new_cache(2, 48)
    with torch.no_grad():
        step = torch.cat([model(IDS[:, :10], cache=cache), model(IDS[:, 10:], cache=cache)], dim=1)
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


hf = pytest.importorskip("rlpt.models.hf")


def _hf_policy(seed=0):
    return hf.HFPolicy(hf.gpt_mini_to_hf(tiny_gpt(seed=seed, std=0.2, n_layer=3)))


def test_hf_checkpointed_gradients_equal_the_plain_ones():
    policy = _hf_policy(seed=1)
    plain = _grads(policy)
    set_grad_checkpointing(policy)
    assert policy.grad_checkpointing
    _assert_equal_grads(plain, _grads(policy))
    norms = [layer.input_layernorm for layer in policy.model.model.layers]   # HF checkpoints forward, inside hooks
    assert _count_block_calls(policy, norms) == [2 * len(norms)]
    assert _saved_bytes(policy) < 0.5 * _saved_bytes(_hf_policy(seed=1))
    set_grad_checkpointing(policy, False)
    assert not policy.grad_checkpointing
    assert _count_block_calls(policy, norms) == [len(norms)]


def test_hf_lora_checkpointed_adapter_gradients_equal_the_plain_ones():
    """A frozen base under checkpointing: the adapters still get their gradients (use_reentrant=False)."""
    pytest.importorskip("peft")
    from rlpt.models.lora import LoraSpec, apply_lora
    policy = apply_lora(_hf_policy(seed=2), LoraSpec(r=4, alpha=8))
    with torch.no_grad():                       # B != 0, so the A's get a gradient too
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    plain = _grads(policy)
    ckpt_policy = copy.deepcopy(policy)
    set_grad_checkpointing(ckpt_policy)
    assert ckpt_policy.grad_checkpointing and not policy.grad_checkpointing
    ckpt = _grads(ckpt_policy)
    assert all("lora_" in n for n in plain[1]) and any("lora_A" in n for n in plain[1])
    _assert_equal_grads(plain, ckpt)
    assert all(g.abs().sum() > 0 for g in ckpt[1].values())


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="trainer.grad_checkpointing"):
        set_grad_checkpointing(torch.nn.Linear(2, 2))
