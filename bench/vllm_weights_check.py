"""What rollout.backend=vllm hands vLLM, checked against vLLM's own code without a GPU (no engine is started).

    PYTHONPATH=. .venv-vllm/bin/python bench/vllm_weights_check.py      # any Python where `import vllm` works

For gpt_mini (tied and untied), a LoRA HFPolicy (served merged) and a Qwen2 (q/k/v biases, tied):
1. vLLM's ModelConfig reads the directory rlpt/engine/vllm_backend.py writes (architecture, length, dtype, logprobs
   mode);
2. vLLM's own model class, built by its `initialize_model` as its loader builds it, loads `hf_state`'s names: every
   parameter loaded, fused q/k/v (and its bias) and gate/up, the embedding and an untied head equal to the source's;
3. vLLM's in-place `reload_weights(..., is_checkpoint_format=True)`, what `Worker.reload_weights` runs on each weight
   update, leaves vLLM's parameters equal to the source's after every source weight was changed in place.
vLLM picks an attention backend from its platform, and a CUDA build on a machine without a GPU finds none: this
script names one (FlexAttention) so the model can be built. Nothing runs a forward. Prints one line per model and
exits 1 if any check fails. Measured once on a CPU box with vllm 0.33.0 (docs/real_models.md, "The vLLM backend").
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from vllm.config import DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.distributed.parallel_state import init_distributed_environment, initialize_model_parallel  # noqa: E402
from vllm.model_executor.model_loader.reload.inplace import reload_weights  # noqa: E402
from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

from rlpt.engine.vllm_backend import LOGPROBS_MODE, hf_state, write_hf_dir  # noqa: E402
from rlpt.models.hf import HFPolicy, gpt_mini_to_hf  # noqa: E402
from rlpt.models.lora import LoraSpec, apply_lora  # noqa: E402

from conftest import tiny_gpt  # noqa: E402

if current_platform.is_unspecified():      # see the module doc: only so that the model can be constructed
    current_platform.get_attn_backend_cls = \
        lambda *a, **k: "vllm.v1.attention.backends.flex_attention.FlexAttentionBackend"


def lora_llama():
    policy = apply_lora(HFPolicy(gpt_mini_to_hf(tiny_gpt(seed=2, std=0.1, d_model=64, n_head=2,
                                                         tie_embeddings=False))), LoraSpec(r=4, alpha=8))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return policy


def qwen2():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        tie_word_embeddings=True))


def fused_equal(params: dict, ref: dict, layer: int) -> bool:
    p = f"model.layers.{layer}."
    ok = torch.equal(params[p + "self_attn.qkv_proj.weight"],
                     torch.cat([ref[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
    ok &= torch.equal(params[p + "mlp.gate_up_proj.weight"],
                      torch.cat([ref[p + "mlp.gate_proj.weight"], ref[p + "mlp.up_proj.weight"]]))
    V = ref["model.embed_tokens.weight"].shape[0]                      # vLLM pads the vocabulary
    ok &= torch.equal(params["model.embed_tokens.weight"][:V], ref["model.embed_tokens.weight"])
    if "lm_head.weight" in ref:                                          # untied: the head is loaded on its own
        ok &= torch.equal(params["lm_head.weight"][:V], ref["lm_head.weight"])
    if p + "self_attn.qkv_proj.bias" in params:
        ok &= torch.equal(params[p + "self_attn.qkv_proj.bias"],
                          torch.cat([ref[p + f"self_attn.{x}_proj.bias"] for x in "qkv"]))
    return bool(ok)


def main() -> int:
    cases = [("gpt_mini tied", tiny_gpt(seed=1, std=0.1, d_model=64, n_head=2, tie_embeddings=True)),
             ("gpt_mini untied", tiny_gpt(seed=1, std=0.1, d_model=64, n_head=2, tie_embeddings=False)),
             ("LoRA HFPolicy (merged)", lora_llama()), ("Qwen2 (biases, tied)", qwen2())]
    failed, first = False, True
    for name, model in cases:
        out = write_hf_dir(model, tempfile.mkdtemp(prefix="rlpt-vllm-check-"))
        mc = ModelConfig(model=str(out), skip_tokenizer_init=True, dtype="float32", logprobs_mode=LOGPROBS_MODE)
        vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"))
        with set_current_vllm_config(vc), torch.device("cpu"):
            if first:
                init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                             distributed_init_method="tcp://127.0.0.1:29617")
                initialize_model_parallel(1, 1)
                first = False
            m = initialize_model(vllm_config=vc)
            loaded = m.load_weights(list(hf_state(model).items()))
            process_weights_after_loading(m, mc, torch.device("cpu"))
            params = dict(m.named_parameters())
            start_ok = set(params) <= set(loaded) and fused_equal(params, hf_state(model), 0)
            with torch.no_grad():                   # a weight update: every source weight changed in place
                g = torch.Generator().manual_seed(1)
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
            reload_weights(vc, m, list(hf_state(model).items()), None, True)
            params = dict(m.named_parameters())
            reload_ok = all(fused_equal(params, hf_state(model), i) for i in range(2))
        ok = start_ok and reload_ok
        failed |= not ok
        print(f"{name}: {mc.architectures[0]}, max_model_len {mc.max_model_len}, {mc.dtype}, {mc.logprobs_mode}; "
              f"loaded {len(set(loaded) & set(params))} of {len(params)} parameters, fused equal {start_ok}; "
              f"after reload_weights equal {reload_ok}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
