"""What PPO's critic adds to a LoRA policy's memory, three ways (rlpt.framework.critic's choice, measured).

    adapters     rlpt's: the HF decoder copied with every frozen tensor shared (Critic(policy)): its own adapters
                 on the policy's base, + the value head
    frozen_copy  the decoder deep-copied as is: a second frozen base + its own adapters + the head
    full_copy    a second full trainable trunk (every weight of the copy trains) + the head

For each: the bytes the critic adds (unique storages not already the policy's; weights), the bytes that train
(each also gets a gradient and two AdamW moments: 3x more), and the measured resident-set growth over building the
critic and one optimizer step of a value loss on it (gradients kept), each variant in a fresh child process with
glibc's mmap threshold at 64 KiB so the resident set follows the live tensors (as bench/memory.py).

    python bench/critic_memory.py                       # random-initialised Llama 8 x 512, GQA 8/4, d_ff 1408,
                                                        # vocab 8192, untied (~30 M), LoRA r 8 all-linear
    python bench/critic_memory.py --layers 4 --d 128 --ff 352 --vocab 50 --heads 4 --kv 2    # gpt_mini's shape
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

VARIANTS = ("adapters", "frozen_copy", "full_copy")


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def storages(module) -> dict[int, int]:
    return {p.data_ptr(): p.numel() * p.element_size() for p in module.parameters()}


def child(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlpt.framework.critic import Critic, hf_decoder
    from rlpt.models.hf import HFPolicy
    from rlpt.models.lora import LoraSpec, apply_lora
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.ff,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv,
                      max_position_embeddings=256, tie_word_embeddings=False)
    policy = apply_lora(HFPolicy(LlamaForCausalLM(cfg).eval()), LoraSpec(r=args.r, alpha=2.0 * args.r))
    mine = storages(policy)
    before = rss()
    critic = Critic(policy)
    if args.variant != "adapters":            # the alternatives: the decoder copied without sharing the base
        critic.trunk, critic.base_names = copy.deepcopy(hf_decoder(policy)), set()
        if args.variant == "full_copy":
            critic.trunk.requires_grad_(True)
    added = sum(b for ptr, b in storages(critic).items() if ptr not in mine)
    trainable = [p for p in critic.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    critic(ids).pow(2).mean().backward()
    opt.step()
    return {"variant": args.variant, "params_total": sum(p.numel() for p in policy.parameters()),
            "critic_added_bytes": added, "critic_trainable_bytes": sum(p.numel() * 4 for p in trainable),
            "rss_growth_bytes": rss() - before, "state_dict_bytes": sum(v.numel() * v.element_size()
                                                                      for v in critic.state_dict().values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--ff", type=int, default=1408)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--variant", choices=VARIANTS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    rows = []
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", v], capture_output=True,
                             text=True, env=env, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mb = 1e6
    print(f"policy: {rows[0]['params_total'] / 1e6:.1f} M parameters, LoRA r {args.r} all-linear, fp32")
    print(f"{'critic':<12} {'adds (weights)':>15} {'trains':>10} {'+grad+AdamW':>12} {'state.pt':>10} "
          f"{'RSS growth':>11}")
    for r in rows:
        t = r["critic_trainable_bytes"]
        print(f"{r['variant']:<12} {r['critic_added_bytes'] / mb:>12.2f} MB {t / mb:>7.2f} MB "
              f"{(r['critic_added_bytes'] + 3 * t) / mb:>9.2f} MB {r['state_dict_bytes'] / mb:>7.2f} MB "
              f"{r['rss_growth_bytes'] / mb:>8.1f} MB")
    print(json.dumps({"bench": "critic_memory", "rows": rows}))


if __name__ == "__main__":
    main()
