"""The naive decode loop: the reference every engine test compares against, token for token.

    for t in 1..max_tokens:  logits = model(prompt + out)[-1];  y = argmax(logits);  stop at EOS

No cache, no batching, no padding: each step is a full causal forward over the whole sequence, so it
costs O(L²) and cannot be wrong in the ways a KV cache can (positions, masks, stale blocks). Its
log-probs are log_softmax of the untempered logits, what the engine reports at temperature 0.
"""
from __future__ import annotations

import torch


@torch.inference_mode()
def naive_greedy(model, prompt: list[int], max_tokens: int, eos_id: int | None = None
                 ) -> tuple[list[int], list[float]]:
    """-> (tokens, their log-probs) of greedy decoding, capped by max_tokens and model.cfg.max_seq_len."""
    ids = list(prompt)
    out, logps = [], []
    while len(out) < max_tokens and len(ids) < model.cfg.max_seq_len:
        logits = model(torch.tensor([ids], device=model.embed.weight.device))[0, -1].float()   # (V,)
        logp = torch.log_softmax(logits, -1)
        y = int(logits.argmax())
        out.append(y)
        logps.append(float(logp[y]))
        ids.append(y)
        if y == eos_id:
            break
    return out, logps

