"""LoRA through `peft`: a policy with low-rank adapters, the reference as the same model with them disabled,
and adapter-only payloads for weight sync and checkpoints.

    W' = W + (α / r) · B A,    A ∈ R^{r×d_in} (random), B ∈ R^{d_out×r} (zeros): W' = W at step 0 (Hu et al. 2021)

    policy = apply_lora(load_hf_policy("out/grpo-hf"), LoraSpec(r=8, alpha=16, targets="all-linear"))
    ref = AdapterDisabled(policy)          # π_ref: the same weights with the adapters off, no second copy
    Reference(ref)                         # rlpt.framework.reference: its deepcopy of `ref` is `ref` itself
    sd = lora_state_dict(policy)           # adapter tensors only: what an adapter-only sync / checkpoint moves
    merged = merged_state_dict(policy)     # base names, W + ΔW: what a merged sync pushes (TRL's names)
    save_adapter(policy, "ckpt/adapter")   # adapter_model.safetensors + adapter_config.json, nothing else

The rollout's copy and its weight sync (`lora.sync`, rlpt.framework.weight_sync's `payload`):

    lora.sync=adapters (default)   rollout = rollout_copy(policy, "adapters"): an AdapterRollout holding its own
                                   A, B and the trainer's frozen base tensors themselves (shared, never copied);
                                   a sync moves adapter_payload(policy) = the A, B only (9.7 % of the bytes on
                                   gpt_mini's shape, r 8); its state_dict (state.pt) is the adapters only
    lora.sync=merged               rollout = rollout_copy(policy, "merged"): a plain HF model (no peft), a second
                                   full copy; a sync moves merged_payload(policy) = W + α/r·BA for every weight:
                                   what an engine that knows nothing of LoRA needs (vLLM without --enable-lora)

As in TRL (`with model.disable_adapter():` in its DPO/PPO/GRPO utils), the reference is the base model
reached by switching the adapters off: it equals a frozen copy of the base to 0.0 because the base weights
never receive a gradient (peft freezes them). LoRA dropout must be 0: a live dropout makes the trainer's
log-probs differ from the rollout's, and rlpt's `check/logp_mismatch` would (rightly) fire.

The engine serves a LoRA policy as is (rlpt/engine/weights.py merges B A into its fused weights whenever
the adapter changes), so the trainer's model is also the rollout's, with no merge step.

Needs the optional dependency: `pip install rlpt[hf]` (transformers, peft).
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from rlpt.models.hf import HFPolicy

ALL_LINEAR = "all-linear"     # peft: every nn.Linear but the output head


@dataclass
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    targets: str | list[str] = field(default=ALL_LINEAR)    # "all-linear" or module names, e.g. ["q_proj", "v_proj"]
    dropout: float = 0.0

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora.r={self.r} must be >= 1 (the adapter's rank)")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha={self.alpha} must be > 0 (the update is scaled by alpha / r)")
        if self.dropout != 0.0:
            raise ValueError(f"lora.dropout={self.dropout}: must be 0 for RL (a live dropout makes the trainer's "
                             "log-probs differ from the rollout's)")
        if isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            self.targets = [self.targets]
        if not self.targets:
            raise ValueError("lora.targets is empty: name the modules to adapt (e.g. [q_proj, v_proj]) or 'all-linear'")


def _peft_model(model):
    """The peft model inside `model` (a PeftModel, or an HFPolicy whose .model is one); ValueError if none."""
    inner = getattr(model, "model", None) if not hasattr(model, "disable_adapter") else model
    if inner is None or not hasattr(inner, "disable_adapter"):
        raise ValueError(f"{type(model).__name__} has no LoRA adapter: wrap it with rlpt.models.lora.apply_lora")
    return inner


def apply_lora(policy, spec: LoraSpec):
    """Add LoRA adapters to a HF causal LM or an HFPolicy (whose `.model` becomes the peft model, in place).

    Only the adapters require grad afterwards. -> the policy (HFPolicy) or the peft model."""
    from peft import LoraConfig, get_peft_model
    is_policy = hasattr(policy, "new_cache") and isinstance(getattr(policy, "model", None), nn.Module)
    hf = policy.model if is_policy else policy
    if hasattr(hf, "disable_adapter"):
        raise ValueError("the model already has a LoRA adapter; apply_lora once")
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, bias="none",
                        target_modules=spec.targets, task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(hf, config)
    except ValueError as e:       # e.g. a target module name the model does not have
        raise ValueError(f"lora.targets={spec.targets!r} does not fit {type(hf).__name__}: {e}") from None
    if is_policy:
        policy.model = peft_model
        return policy
    return peft_model


@contextmanager
def adapter_disabled(model) -> Iterator[None]:
    """Run the base model: every adapter off inside the block, back on after (also on an exception)."""
    with _peft_model(model).disable_adapter():
        yield


class AdapterDisabled(nn.Module):
    """π_ref as a view: `ref(ids)` is the policy's forward with the adapters disabled, in eval mode, no grad.

    It owns no parameters (the policy is held outside the module tree), so `Reference.freeze()` cannot
    freeze the adapters, and a deepcopy returns the view itself: no second copy of the model."""

    def __init__(self, policy):
        super().__init__()
        _peft_model(policy)                       # fail now if there is no adapter to disable
        object.__setattr__(self, "policy", policy)

    def __deepcopy__(self, memo):
        return self

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        was = self.policy.training
        self.policy.eval()
        try:
            with adapter_disabled(self.policy):
                out = self.policy(input_ids)
        finally:
            self.policy.train(was)
        return getattr(out, "logits", out)


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter tensors only (peft's names): the payload of an adapter-only sync or checkpoint."""
    from peft import get_peft_model_state_dict
    return {k: v.detach() for k, v in get_peft_model_state_dict(_peft_model(model)).items()}


class AdapterWeights(nn.Module):
    """The adapters of `policy` as a module whose state_dict is `lora_state_dict` (live tensors, peft's names):
    what an rlpt checkpoint of a LoRA run saves and loads (rlpt.checkpoint), the base left out."""

    def __init__(self, policy):
        super().__init__()
        _peft_model(policy)
        object.__setattr__(self, "policy", policy)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return lora_state_dict(self.policy)


def load_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors (from `lora_state_dict`) into a model with the same adapter; strict."""
    from peft import set_peft_model_state_dict
    res = set_peft_model_state_dict(_peft_model(model), state)
    bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise ValueError(f"adapter state has tensors the model lacks: {bad[:4]} (another r or targets?)")


def payload_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict's tensors, a tied tensor (embedding = head) counted once."""
    unique = {(t.data_ptr(), t.numel(), t.dtype): t for t in state.values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own names with every active adapter merged in (W + α/r·BA):
    what a merged weight sync pushes to a rollout engine that knows nothing of LoRA (TRL's sync_weights
    names: `.base_layer` dropped, `lora_*` skipped). Computed out of place, never by peft's merge/unmerge:
    W + ΔW − ΔW is not W in floating point, and the base must stay bit-exact (it is the reference)."""
    base = _peft_model(model).get_base_model()
    lora = {name: m for name, m in base.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}
    out = {}
    for name, t in base.state_dict().items():
        if "lora_" in name or "original_module" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        m = lora.get(owner.removesuffix(".base_layer")) if owner.endswith(".base_layer") else None
        if m is not None and leaf == "weight" and not m.merged and not m.disable_adapters:
            for adapter in m.active_adapters:
                if adapter in m.lora_A:
                    t = t + m.get_delta_weight(adapter)
        out[name.replace(".base_layer", "")] = t.detach().clone()
    return out


def save_adapter(model, out_dir: str | Path) -> Path:
    """adapter_model.safetensors + adapter_config.json (peft's layout): the adapters only, never the base."""
    out_dir = Path(out_dir)
    _peft_model(model).save_pretrained(out_dir)
    return out_dir


def load_adapter(base, adapter_dir: str | Path):
    """A HF base model (not yet adapted) + a `save_adapter` directory -> the peft model, adapters trainable."""
    from peft import PeftModel
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{str(adapter_dir)!r} has no adapter_config.json: not a save_adapter directory")
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)


# -- the rollout's copy and what a weight sync moves (lora.sync) ------------------------------------------------
SYNC_MODES = ("adapters", "merged")


def adapter_payload(model) -> dict[str, torch.Tensor]:
    """What an adapter-only sync moves: the trainer's A and B (under the model's own parameter names, which an
    AdapterRollout shares), nothing of the frozen base. Bytes: Σ_adapted linears r · (d_in + d_out) · 4 (fp32)."""
    named = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    if not named:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter: lora.sync=adapters needs lora.r > 0")
    return named


def merged_payload(model) -> dict[str, torch.Tensor]:
    """What a merged sync moves: every base parameter with its adapter merged in (merged_state_dict), under the
    names of the plain model `rollout_copy(model, "merged")` holds (a tied weight once, as named_parameters)."""
    base = _peft_model(model).get_base_model()
    names = {n.replace(".base_layer", "") for n, _ in base.named_parameters() if "lora_" not in n}
    prefix = "model." if isinstance(model, HFPolicy) else ""     # an HFPolicy's parameters live under .model
    return {prefix + n: t for n, t in merged_state_dict(model).items() if n in names}


class AdapterRollout(HFPolicy):
    """The rollout's copy of a LoRA policy under lora.sync=adapters: its own adapters, the trainer's frozen base.

    Built by `rollout_copy`: a deepcopy of the peft model in which every frozen tensor maps to itself, so the base
    exists once in the process and only A, B are new. The engine serves it as any LoRA policy (W + α/r·BA merged
    into its fused weights when A or B change). Its state_dict is the adapters only: the base never changes (it is
    model.hf_path's), so a checkpoint's rollout state (state.pt) holds no second copy of the model."""

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        out = {prefix + k: v for k, v in lora_state_dict(self).items()}
        if destination is not None:
            destination.update(out)
            return destination
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        load_lora_state(self, state_dict)

    def shares_base_with(self, policy) -> bool:
        """Whether every frozen tensor of `policy` is this copy's own (the same storage, not an equal copy)."""
        mine = {p.data_ptr() for p in self.parameters() if not p.requires_grad}
        theirs = [p.data_ptr() for p in policy.parameters() if not p.requires_grad]
        return bool(theirs) and all(ptr in mine for ptr in theirs)


def rollout_copy(policy: HFPolicy, sync: Literal["adapters", "merged"] = "adapters") -> HFPolicy:
    """The rollout's own model for a LoRA `policy` (an HFPolicy around a peft model); see the module doc."""
    if sync not in SYNC_MODES:
        raise ValueError(f"lora.sync={sync!r}: must be one of {', '.join(SYNC_MODES)}")
    if not isinstance(policy, HFPolicy):
        raise ValueError(f"rollout_copy takes the HFPolicy around a LoRA model, got {type(policy).__name__}")
    peft_model = _peft_model(policy)
    if sync == "adapters":
        frozen = {id(p): p for p in peft_model.parameters() if not p.requires_grad}   # deepcopy's memo: kept as is
        return AdapterRollout(copy.deepcopy(peft_model, frozen), policy.tokenizer)
    plain = copy.deepcopy(peft_model).merge_and_unload()         # LoRA layers -> nn.Linear, peft gone
    plain.load_state_dict(merged_state_dict(policy))             # exactly what every merged sync will push
    return HFPolicy(plain.eval(), policy.tokenizer)
