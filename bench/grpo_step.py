"""GRPO step time and where it goes: median wall-clock per role over a fixed setup.

    step = rollout (sample B×K) + verify + ref (one forward) + train (fwd + bwd + AdamW) + sync

Setup (stated in the JSON): gpt_mini default (4 × 128, 0.81 M parameters), chain-of-thought
arithmetic, B prompts × K samples × max_tokens, one epoch, sync every step. The baseline measured in
the same run is a bare loop doing the same work without the framework: `generate` on the same
prompts, one `per_token_logp` under no_grad for the reference, one forward + backward + AdamW step
on the same collated batch. The ratio framework / bare shows the framework's overhead; the two
policies train apart, so compare their response lengths (both in the JSON) before reading it.

    python bench/grpo_step.py [--threads 2] [--steps 12] [--prompts 16] [--k 8] [--max-tokens 32] [--backend engine]
                              [--set algorithm.beta=0 ...]   any `rlpt train` key=value
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlpt.checkpoint import save_checkpoint
from rlpt.config import ModelConfig
from rlpt.framework.trajectory import per_token_logp
from rlpt.gpt_mini.generate import generate
from rlpt.gpt_mini.model import make_model
from rlpt.gpt_mini.tokenizer import CharTokenizer
from rlpt.train import build, load_train_job


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--backend", default="simple", choices=["simple", "engine"],
                   help="rollout.backend; simple here (not the framework's default, engine) so that the "
                        "ratio to the bare loop, which always uses the simple sampler, isolates the framework's "
                        "overhead; --backend engine shows what the engine saves")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more `rlpt train` overrides, e.g. algorithm.beta=0 (no KL term: the reference forward "
                        "is skipped)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # A random-weight policy samples long, varied responses; a verifier that always gives mixed
    # groups (reward = parity of length) keeps every step non-degenerate, so each step does full work.
    tmp = Path(tempfile.mkdtemp())
    model = make_model(ModelConfig(), CharTokenizer())
    save_checkpoint(tmp / "init", model, model.cfg.to_dict(), {"step": 0})
    job = load_train_job(None, [f"init_from={tmp / 'init'}", f"rollout.prompts_per_step={args.prompts}",
                                f"rollout.k={args.k}", f"rollout.max_tokens={args.max_tokens}", "run.progress=false",
                                f"rollout.backend={args.backend}", *args.set])
    ctl, _ = build(job, tmp / "init")
    ctl.env.verify = lambda prompt, response: float(len(response) % 2)
    ctl.logp_tol = None

    roles = ("time/rollout", "time/verify", "time/ref", "time/train", "time/sync")
    tok = ctl.rollout.tokenizer
    bare_policy = copy.deepcopy(ctl.trainer.model)   # the bare loop trains its own copy
    bare_opt = torch.optim.AdamW(bare_policy.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    fw, bare, bare_len = [], [], []
    for i in range(3 + args.steps):
        t0 = time.perf_counter()
        m = ctl.step()
        total = time.perf_counter() - t0
        if i >= 3:
            fw.append({**{k: m.get(k, 0.0) for k in roles}, "total": total, "tokens": m["response/len_mean"]})
        # bare baseline: the same work with no roles and no trajectories
        t0 = time.perf_counter()
        prompts = [ctl.env.reset().ids for _ in range(args.prompts) for _ in range(args.k)]
        samples = generate(bare_policy, prompts, ctl.rollout.sampling, tok.eos_id, tok.pad_id)
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(pr + s.tokens) for pr, s in zip(prompts, samples)],
                                              batch_first=True, padding_value=tok.pad_id)
        with torch.no_grad():
            per_token_logp(ctl.reference.model, ids)
        loss = -per_token_logp(bare_policy, ids).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare_policy.parameters(), 1.0)
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)
        if i >= 3:
            bare.append(time.perf_counter() - t0)
            bare_len.append(sum(len(x.tokens) for x in samples) / len(samples))

    med = {k: statistics.median(s[k] for s in fw) for k in (*roles, "total")}
    bare_med = statistics.median(bare)
    print(f"GRPO step, B={args.prompts} prompts x K={args.k} samples x max {args.max_tokens} tokens, "
          f"{args.threads} threads, median of {args.steps} steps")
    print(f"{'role':<14}{'seconds':>10}{'share':>8}")
    for k in roles:
        print(f"{k:<14}{med[k]:>10.4f}{med[k] / med['total']:>8.1%}")
    print(f"{'total':<14}{med['total']:>10.4f}")
    print(f"{'bare loop':<14}{bare_med:>10.4f}   (same sampling + ref forward + fwd/bwd/AdamW, no framework)")
    print(json.dumps({"bench": "grpo_step", "backend": args.backend, "prompts": args.prompts, "k": args.k,
                      "max_tokens": args.max_tokens, "threads": args.threads, "steps": args.steps, "set": args.set,
                      "step_s_median": round(med["total"], 4), "bare_s_median": round(bare_med, 4),
                      "overhead_ratio": round(med["total"] / bare_med, 3),
                      **{k.replace("time/", "") + "_s": round(med[k], 4) for k in roles},
                      "response_len_mean": round(statistics.median(s["tokens"] for s in fw), 2),
                      "bare_response_len_mean": round(statistics.median(bare_len), 2)}))


if __name__ == "__main__":
    main()
