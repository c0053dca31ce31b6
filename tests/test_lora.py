"""rlpt.models.lora: LoRA (peft) on gpt_mini exported to HF. The reference is the adapter-disabled model,
equal to a frozen copy of the base to 0.0; adapter payloads are <= 10 % of the full weights; adapter
checkpoints hold adapters only; the engine serves the adapted model (and the base, adapters off)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft")
import rlpt.algorithms  # noqa: E402, F401 - registers the algorithms make_algorithm builds
from rlpt.engine import LLM, SamplingParams  # noqa: E402
from rlpt.framework.algorithm import make_algorithm  # noqa: E402
from rlpt.framework.controller import Controller  # noqa: E402
from rlpt.framework.reference import Reference  # noqa: E402
from rlpt.framework.rollout import Rollout  # noqa: E402
from rlpt.framework.trainer import Trainer  # noqa: E402
from rlpt.framework.trajectory import per_token_logp  # noqa: E402
from rlpt.framework.weight_sync import WeightSyncer  # noqa: E402
from rlpt.gpt_mini.generate import SamplingParams as RolloutParams  # noqa: E402
from rlpt.gpt_mini.model import GPT, GPTConfig  # noqa: E402
from rlpt.gpt_mini.task import ArithmeticTask  # noqa: E402
from rlpt.models.hf import HFPolicy, gpt_mini_to_hf  # noqa: E402
from rlpt.models.lora import (  # noqa: E402
    AdapterDisabled,
    AdapterRollout,
    LoraSpec,
    adapter_disabled,
    adapter_payload,
    apply_lora,
    load_adapter,
    load_lora_state,
    lora_state_dict,
    merged_payload,
    merged_state_dict,
    payload_bytes,
    rollout_copy,
    save_adapter,
)

from conftest import TOK, ParityEnv, tiny_gpt  # noqa: E402

IDS = torch.tensor([TOK.encode("<12+7+9>28#"), TOK.encode("(1+2)*3=9#x")])      # (2, 11)


def _policy(seed=0, **spec):
    """An HFPolicy of a peaked tiny gpt_mini exported to Llama, with LoRA (r 4 unless given)."""
    hf = gpt_mini_to_hf(tiny_gpt(seed=seed, std=0.3, norm_std=0.2))
    base = copy.deepcopy(hf)
    return apply_lora(HFPolicy(hf), LoraSpec(**{"r": 4, "alpha": 8, **spec})), base


def _train(policy, steps=3, lr=0.05):
    """A few AdamW steps on the adapters (the base is frozen by peft), so B A is no longer zero."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = -torch.log_softmax(policy(IDS[:, :-1]), -1).gather(-1, IDS[:, 1:, None]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_only_adapters_train_and_start_equal_to_the_base():
    policy, base = _policy()
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"}           # all-linear, not lm_head
    with torch.no_grad():
        assert torch.equal(policy(IDS), base(IDS).logits)                   # B = 0: W' = W exactly


def test_reference_is_the_frozen_base_exactly_without_a_copy():
    policy, base = _policy()
    _train(policy)
    ref = AdapterDisabled(policy)
    with torch.no_grad():
        adapted, frozen = policy(IDS), base(IDS).logits
        assert (adapted - frozen).abs().max() > 1e-2                        # the adapters did move the policy
        assert torch.equal(ref(IDS), frozen)                                # π_ref == frozen base, to 0.0
        assert torch.equal(policy(IDS), adapted)                            # adapters back on afterwards
    assert list(ref.parameters()) == [] and copy.deepcopy(ref) is ref      # no second copy
    reference = Reference(ref)                                              # rlpt's role: deepcopy + freeze
    assert reference.model is ref
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)   # freeze touched nothing
    assert torch.equal(per_token_logp(reference.model, IDS), per_token_logp(HFPolicy(base), IDS))
    with adapter_disabled(policy), torch.no_grad():
        assert torch.equal(policy(IDS), frozen)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        AdapterDisabled(HFPolicy(copy.deepcopy(base)))


def test_adapter_payload_is_at_most_ten_percent_of_full_weights_on_gpt_mini():
    hf = gpt_mini_to_hf(GPT(GPTConfig(vocab_size=TOK.vocab_size)))          # gpt_mini's default shape, exported
    full = payload_bytes(hf.state_dict())
    peft_model = apply_lora(hf, LoraSpec(r=8, alpha=16))
    adapters = lora_state_dict(peft_model)
    assert adapters and all("lora_" in k for k in adapters)
    ratio = payload_bytes(adapters) / full
    assert 0.05 < ratio <= 0.10, ratio                                      # measured 0.0973 (r 8, all-linear, fp32)


def test_adapter_checkpoint_holds_adapters_only_and_round_trips(tmp_path):
    policy, base = _policy()
    _train(policy)
    out = save_adapter(policy, tmp_path / "adapter")
    files = {p.name for p in out.iterdir()} - {"README.md"}                 # peft's model card, no tensors
    assert files == {"adapter_model.safetensors", "adapter_config.json"}, files
    from safetensors.torch import load_file
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    size = (out / "adapter_model.safetensors").stat().st_size             # tensors + a JSON header, no base
    assert payload_bytes(saved) == payload_bytes(lora_state_dict(policy)) <= size < payload_bytes(saved) + 8192
    restored = load_adapter(copy.deepcopy(base), out)
    with torch.no_grad():
        assert torch.equal(restored(IDS).logits, policy(IDS))
    # adapter-only sync: the tensors alone, loaded into a second adapted copy, give the same function
    other, _ = _policy()
    load_lora_state(other, lora_state_dict(policy))
    with torch.no_grad():
        assert torch.equal(other(IDS), policy(IDS))


def test_merged_state_dict_has_base_names_and_leaves_the_base_bit_exact():
    policy, base = _policy()
    _train(policy)
    before = {k: v.clone() for k, v in policy.model.get_base_model().state_dict().items()}
    merged = merged_state_dict(policy)
    assert merged.keys() == base.state_dict().keys()                       # HF names, no base_layer / lora_
    fresh = copy.deepcopy(base)
    fresh.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, policy(IDS), atol=1e-5, rtol=0)
    after = policy.model.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)           # nothing merged in place


def test_engine_serves_the_adapted_policy_and_the_base_with_adapters_off():
    policy, base = _policy(seed=1)
    _train(policy)
    llm = LLM(policy, block_size=4)
    prompts = [TOK.encode("<3+4+5>"), TOK.encode("(1+2)*3=")]
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=0)
    for out in llm.generate(prompts, sp):
        for c in out.outputs:
            seq = torch.tensor([out.prompt_token_ids + c.token_ids])
            want = per_token_logp(policy, seq)[0, len(out.prompt_token_ids) - 1:]
            torch.testing.assert_close(torch.tensor(c.token_logprobs), want, atol=1e-5, rtol=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    with adapter_disabled(policy):
        off = llm.generate(prompts, greedy)
    on = llm.generate(prompts, greedy)
    ref_base = LLM(copy.deepcopy(base), block_size=4).generate(prompts, greedy)
    ref_adapted = LLM(_merged_copy(policy, base), block_size=4).generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in off] == [o.outputs[0].token_ids for o in ref_base]
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in ref_adapted]
    assert [o.outputs[0].token_ids for o in on] != [o.outputs[0].token_ids for o in off]


def _merged_copy(policy, base):
    fresh = copy.deepcopy(base)
    fresh.load_state_dict(merged_state_dict(policy))
    return fresh


def test_bad_specs_are_clear_errors():
    with pytest.raises(ValueError, match="lora.dropout"):
        LoraSpec(dropout=0.1)
    with pytest.raises(ValueError, match="lora.r"):
        LoraSpec(r=0)
    with pytest.raises(ValueError, match="lora.targets"):
        _policy(targets=["no_such_proj"])
    policy, _ = _policy()
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(policy, LoraSpec())


def _synced(policy, rollout_model, payload=None):
    """One WeightSyncer.sync from the policy into rollout_model (the roles as plain namespaces)."""
    syncer = WeightSyncer(1, payload)
    trainer, rollout = SimpleNamespace(model=policy, version=1), SimpleNamespace(model=rollout_model, version=0)
    assert syncer.sync(trainer, rollout) and rollout.version == 1
    return syncer


def test_adapter_only_sync_moves_the_adapter_bytes_exactly_on_gpt_mini():
    """gpt_mini's default shape (4 x 128, d_ff 352, tied), exported, LoRA r 8 on all 7 linears, fp32: the bytes
    each sync moves, from the shapes. Full: every parameter once; adapters: r·(d_in + d_out) per linear."""
    cfg = GPTConfig(vocab_size=TOK.vocab_size)
    L, d, f, V, r = cfg.n_layer, cfg.d_model, cfg.d_ff, cfg.vocab_size, 8
    kv = cfg.n_kv_head * cfg.head_dim
    full_bytes = 4 * (V * d + L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d)   # embed (= head), blocks, norm
    adapter_bytes = 4 * r * L * (2 * (d + d) + 2 * (d + kv) + 2 * (d + f) + (f + d))   # q o, k v, gate up, down
    policy = apply_lora(HFPolicy(gpt_mini_to_hf(GPT(cfg))), LoraSpec(r=r, alpha=16))
    _train(policy, steps=1, lr=1e-3)
    full = _synced(policy, copy.deepcopy(policy))                                   # every parameter, full copy
    adapters = _synced(policy, rollout_copy(policy, "adapters"), adapter_payload)
    merged = _synced(policy, rollout_copy(policy, "merged"), merged_payload)
    assert full_bytes == 4 * GPT(cfg).num_params()
    assert adapters.bytes_last == adapter_bytes == 315_392
    assert merged.bytes_last == full_bytes                                          # W + ΔW for every weight
    assert full.bytes_last == full_bytes + adapter_bytes                            # today's copy: base + A, B
    assert adapters.bytes_last / merged.bytes_last <= 0.10                          # 9.7 % (vocab 50)


def test_adapter_rollout_shares_the_frozen_base_and_equals_the_trainer_after_sync():
    policy, _ = _policy(seed=2)
    rollout = rollout_copy(policy, "adapters")
    assert isinstance(rollout, AdapterRollout) and rollout.shares_base_with(policy)
    base_ptrs = {p.data_ptr() for p in policy.parameters() if not p.requires_grad}
    assert all(p.data_ptr() not in base_ptrs for p in rollout.parameters() if p.requires_grad)   # own A, B
    _train(policy)
    with torch.no_grad():
        assert not torch.equal(rollout(IDS), policy(IDS))                          # stale until synced
    _synced(policy, rollout, adapter_payload)
    with torch.no_grad():
        assert torch.equal(rollout(IDS), policy(IDS))                              # same base, same A, B
    state = rollout.state_dict()                                                    # what state.pt keeps
    assert state and all("lora_" in k for k in state) and state.keys() == lora_state_dict(policy).keys()
    assert payload_bytes(state) < 0.2 * payload_bytes(policy.model.get_base_model().state_dict())
    fresh = rollout_copy(_policy(seed=2)[0], "adapters")
    fresh.load_state_dict(state)                                                    # a resume
    with torch.no_grad():
        assert torch.equal(fresh(IDS), policy(IDS))
    with pytest.raises(ValueError, match="lora.sync='nope'"):
        rollout_copy(policy, "nope")
    with pytest.raises(ValueError, match="lacks"):
        _synced(policy, HFPolicy(copy.deepcopy(_policy()[1])), adapter_payload)   # a rollout without adapters


def test_merged_rollout_is_a_plain_model_equal_to_the_trainer_after_sync():
    policy, base = _policy(seed=3)
    rollout = rollout_copy(policy, "merged")
    assert type(rollout) is HFPolicy and type(rollout.model) is type(base)          # no peft on the rollout side
    assert not any("lora_" in n for n, _ in rollout.named_parameters())
    _train(policy)
    _synced(policy, rollout, merged_payload)
    with torch.no_grad():
        torch.testing.assert_close(rollout(IDS), policy(IDS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sync", ["full", "adapters", "merged"])
def test_lora_grpo_steps_through_the_engine_pass_the_logp_check_and_keep_the_reference(sync):
    """The framework's loop on a LoRA HFPolicy: engine rollouts (the adapted weights, synced: a full deep copy,
    the adapters only, or merged weights), π_ref as the adapter-disabled view. The run-time log-prob check holds
    (< 1e-5) and π_ref never moves (0.0)."""
    policy = apply_lora(HFPolicy(gpt_mini_to_hf(tiny_gpt())), LoraSpec(r=4, alpha=8))
    ref = AdapterDisabled(policy)
    with torch.no_grad():
        ref_before = ref(IDS)
    env = ParityEnv(ArithmeticTask(max_operands=3), seed=0, tokenizer=TOK)
    copy_, payload = {"full": (copy.deepcopy(policy), None), "adapters": (rollout_copy(policy), adapter_payload),
                      "merged": (rollout_copy(policy, "merged"), merged_payload)}[sync]
    rollout = Rollout(copy_, TOK, 3, RolloutParams(max_tokens=8, temperature=1.0), backend="engine")
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    trainer = Trainer(policy, opt, None, 1.0, 0, 1, 1, temperature=1.0)
    syncer = WeightSyncer(1, payload)
    ctl = Controller(rollout, env, Reference(ref, temperature=1.0), make_algorithm({"name": "grpo"}, 4, 8),
                     trainer, syncer, 4, TOK.pad_id)
    for _ in range(3):
        m = ctl.step()                                   # raises LogpMismatchError past check.logp_tol
        assert m["check/logp_mismatch"] < 1e-5
    with torch.no_grad():
        assert torch.equal(ref(IDS), ref_before)         # the base never moved
        assert not torch.equal(policy(IDS), ref_before)  # the adapters did
    assert rollout._engine.engine(rollout.model).runner.served.kind == "llama"
    named = dict(policy.named_parameters())
    moved = {"full": named, "adapters": lora_state_dict(policy),
             "merged": {k: v for k, v in named.items() if "lora_" not in k}}[sync]   # base + A, B / A, B / W'
    assert syncer.bytes_last == payload_bytes(moved)
