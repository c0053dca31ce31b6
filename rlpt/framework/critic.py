"""Critic: the value model V_φ(s_t) that PPO's GAE needs, as a head on a language model's trunk.

    V(s_t) = w · h_t + b        h_t = the trunk's final hidden state at position t (the input of its lm_head)

`critic(input_ids) -> (B, T-1)`, aligned with `per_token_logp`: column j is the value of the state
that has seen tokens ≤ j, i.e. the state in which token j+1 is chosen (lesson 10, "a single
linear projection from the final hidden state to a scalar").

Two layouts, one class:
  separate  a deep copy of the policy (its trunk starts from the SFT weights) with its own head:
            verl / OpenRLHF / InstructGPT's critic; ≈ 2× the trainable memory (lesson 10).
            A Hugging Face policy (rlpt.models.hf) copies only its decoder (`get_decoder()`: embeddings,
            blocks, final norm; no lm_head, so no (B, T, V) logits per value and no second untied head), and
            the copy shares every *frozen* tensor with the policy instead of duplicating it. Under LoRA
            (lora.r > 0, only the adapters train) the critic is then its own adapters, a copy of the
            policy's, on the policy's frozen base: V_φ has the policy's function at step 0 and trains the
            adapters and the head (its own AdamW moments), while the base exists once in the process and is
            never saved in the critic's state (the run's base is model.hf_path). Why not a full copy: a
            second full trainable trunk costs the model's bytes ×4 more (weights, grads, two AdamW
            moments) for a value model of a policy that is itself only adapted; a frozen second base costs
            the model's bytes for nothing, since the base never changes (measured in docs/real_models.md,
            "PPO and Ray topologies with a Hugging Face policy").
  shared    a head on the policy's own trunk: the hidden state is read from the policy's forward
            (a hook on its output projection, so any causal LM works unchanged), and the value loss's
            gradient flows into the policy's trunk. The trunk is not registered as a submodule: its
            parameters stay the policy's, counted, clipped and checkpointed once.

Who uses it: the algorithm builds it (`make_critic(policy)`); the reference side records V_old
on every trajectory before the update (`Reference(scorers={"values": critic})`); the trainer
optimises it and passes its fresh values to the loss as `values=`. The head starts at zero
(V ≡ 0: the first advantages are the plain returns) and uses no randomness, so building a critic
leaves every RNG untouched.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn as nn


def output_projection(model: nn.Module) -> nn.Module:
    """The module that maps a causal LM's final hidden state to logits (gpt_mini, HF, HFPolicy)."""
    for m in (model, getattr(model, "model", None)):
        if m is None:
            continue
        get = getattr(m, "get_output_embeddings", None)
        head = get() if callable(get) else getattr(m, "lm_head", None)
        if isinstance(head, nn.Module):
            return head
    raise TypeError(f"{type(model).__name__} has no output projection (lm_head / get_output_embeddings()): "
                    "a value head needs the trunk's final hidden state")


@contextmanager
def capture_hidden(model: nn.Module):
    """Within the block, every forward of `model` appends its final hidden state (B, T, d) to the list."""
    store: list[torch.Tensor] = []
    handle = output_projection(model).register_forward_hook(lambda mod, args, out: store.append(args[0]))
    try:
        yield store
    finally:
        handle.remove()


def hf_decoder(model: nn.Module) -> nn.Module | None:
    """A Hugging Face causal LM's decoder (final hidden states, no lm_head) inside an HFPolicy / HF / peft model;
    None for gpt_mini and anything else without `get_decoder`."""
    inner = getattr(model, "model", None)
    get = getattr(inner, "get_decoder", None) if isinstance(inner, nn.Module) else None
    return get() if callable(get) else None


def copy_sharing_frozen(module: nn.Module) -> tuple[nn.Module, set[str]]:
    """A deep copy in which every parameter that does not require grad is the original tensor itself (a LoRA base:
    frozen, so sharing it is exact) -> (the copy, the names of those shared parameters)."""
    frozen = {id(p): p for p in module.parameters() if not p.requires_grad}
    clone = copy.deepcopy(module, dict(frozen))
    return clone, {n for n, p in clone.named_parameters() if id(p) in frozen}


class Critic(nn.Module):
    def __init__(self, policy: nn.Module, shared: bool = False):
        super().__init__()
        self.shared = shared
        self.decoder = False                 # the trunk is an HF decoder (its forward gives the hidden states)
        self.base_names: set[str] = set()    # trunk parameters that are the policy's frozen tensors (not saved)
        if shared:
            self._policy = [policy]          # a list hides it from nn.Module: not our parameters
        else:
            decoder = hf_decoder(policy)
            self.decoder = decoder is not None
            self.trunk, base = copy_sharing_frozen(decoder if self.decoder else policy)
            self.base_names = {"trunk." + n for n in base}
            self._register_state_dict_hook(_drop_base)
            self.register_load_state_dict_post_hook(_base_not_missing)
        head_in = output_projection(policy)
        d = head_in.in_features if hasattr(head_in, "in_features") else head_in.weight.shape[1]
        self.head = nn.Linear(d, 1, device=head_in.weight.device)   # fp32: hidden states are cast up
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def trunk_model(self) -> nn.Module:
        return self._policy[0] if self.shared else self.trunk

    def forward(self, input_ids: torch.Tensor, policy_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> values (B, T-1). A shared critic reuses `policy_hidden` (B, T, d) from the policy's
        forward when given (the trainer's case); otherwise it runs its trunk itself."""
        hidden = policy_hidden if self.shared else None
        if hidden is None and self.decoder:
            hidden = self.trunk(input_ids=input_ids, use_cache=False).last_hidden_state
        elif hidden is None:
            with capture_hidden(self.trunk_model) as store:
                self.trunk_model(input_ids)
            hidden = store[-1]
        return self.head(hidden[:, :-1].float()).squeeze(-1)          # (B, T-1)


def _drop_base(module: Critic, state: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: the shared frozen base is the policy's (model.hf_path), not the critic's to save."""
    for name in module.base_names:
        state.pop(prefix + name, None)


def _base_not_missing(module: Critic, incompatible) -> None:
    """load_state_dict post-hook: a state without the shared base (what `_drop_base` saved) loads strictly."""
    keep = [k for k in incompatible.missing_keys if not any(k.endswith(n) for n in module.base_names)]
    incompatible.missing_keys[:] = keep
