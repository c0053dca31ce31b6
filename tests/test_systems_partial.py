"""Partial rollouts (rlpt.systems.partial): a weight update lands between two segments of a chunk, the rest of each
unfinished sequence is sampled by the new weights, and every token keeps its version and its own μ.

A rollout worker (the plain class, no Ray) on a random tiny policy, with the in-process transport.
"""
from __future__ import annotations

import copy

import torch

from rlpt.framework.offpolicy import behaviour_weights
from rlpt.framework.trajectory import collate, per_token_logp, response_slice
from rlpt.systems.partial import token_staleness
from rlpt.systems.transport import InProcess
from rlpt.systems.workers import RolloutWorker

from conftest import TINY_RL, TOK, tiny_gpt


def worker(tmp_path, *overrides):
    from rlpt.checkpoint import save_checkpoint
    from rlpt.train import build, load_train_job
    policy = tiny_gpt()
    save_checkpoint(tmp_path / "init", policy, policy.cfg.to_dict(), {"step": 0})
    job = load_train_job(None, [*TINY_RL, f"init_from={tmp_path / 'init'}", f"run.out_dir={tmp_path}",
                                "rollout.max_tokens=12", "rollout.prompts_per_step=2", "system.topology=async",
                                "system.partial_rollouts=true", *overrides])
    return RolloutWorker(build, job, tmp_path / "init", 0, "in_process", True), policy


T = 0.7   # rollout.temperature's default: old_logp is recorded under logits / T


def token_logp(model, t) -> torch.Tensor:
    """(R,) log-probs of t's response tokens under `model` at the rollout's temperature, each given its prefix."""
    ids = torch.tensor([t.prompt_ids + t.response_ids])
    with torch.no_grad():
        return per_token_logp(model, ids, T)[0, response_slice(len(t.prompt_ids), len(t.response_ids))]


def test_a_sync_between_segments_gives_sequences_two_versions(tmp_path):
    w, v0 = worker(tmp_path)
    assert w.rollout.sampling.temperature == T
    out = w.generate_partial(2, 3)                          # segment 1: 3 tokens each, weights of version 0
    assert out["done"] is False
    v1 = copy.deepcopy(v0)
    with torch.no_grad():
        for p in v1.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    w.apply(InProcess(True).publish(v1, 1))                 # what the async driver queues between two segments
    segments = 1
    while not out["done"]:
        out = w.generate_partial(0, 3)
        segments += 1
    groups = out["groups"]
    trajs = [t for g in groups for t in g]
    assert len(groups) == 2 and all(len(g) == 4 for g in groups) and segments >= 2
    mixed = [t for t in trajs if len(set(t.extra["version"].tolist())) == 2]
    assert mixed                                             # some sequence spans the update
    for t in trajs:
        v = t.extra["version"]
        assert v.shape == (len(t.response_ids),) and t.version == int(v.min())
        assert v.tolist() == sorted(v.tolist())              # version 0 first, then 1
        assert (v[:3] == 0).all()                            # the first segment was drawn before the sync
        # μ per token: old_logp is each token's log-prob under the weights that drew it, given its prefix
        for model, ver in ((v0, 0), (v1, 1)):
            sel = v == ver
            assert torch.allclose(t.old_logp[sel], token_logp(model, t)[sel], atol=1e-5)
    t = mixed[0]
    sel1 = t.extra["version"] == 1
    assert (token_logp(v0, t)[sel1] - t.old_logp[sel1]).abs().max() > 1e-3    # the two versions really differ
    assert out["version"] == 0                                # the chunk's oldest token

    # staleness per token, for a trainer at version 1: the version-0 tokens are 1 behind, the others fresh
    n_tok = sum(len(t.response_ids) for t in trajs)
    n_old = sum(int((t.extra["version"] == 0).sum()) for t in trajs)
    m = token_staleness(groups, 1)
    assert m["system/token_staleness_max"] == 1.0
    assert abs(m["system/token_staleness_mean"] - n_old / n_tok) < 1e-6
    assert m["system/mixed_version_frac"] == len(mixed) / len(trajs)

    # the off-policy weight is per token: with π_prox = v1, ρ = 1 on the tokens v1 drew, its own ratio on the rest
    batch = collate(trajs, TOK.pad_id)
    with torch.no_grad():
        prox = per_token_logp(v1, batch.input_ids, T)
    w_tis, _, _ = behaviour_weights(prox, batch.old_logp, batch.mask, "tis")
    new_tok = (batch.extra["version"] == 1) & (batch.mask > 0)
    old_tok = (batch.extra["version"] == 0) & (batch.mask > 0)
    assert torch.allclose(w_tis[new_tok], torch.ones(int(new_tok.sum())), atol=1e-4)
    assert (w_tis[old_tok] - 1).abs().max() > 1e-3


def test_without_a_sync_a_partial_chunk_equals_one_version(tmp_path):
    """No update between segments: every token is version 0, nothing is mixed, staleness 0 for a trainer at 0."""
    w, _ = worker(tmp_path, "system.segment_tokens=5")
    out = w.generate_partial(2, 5)
    while not out["done"]:
        out = w.generate_partial(0, 5)
    m = token_staleness(out["groups"], 0)
    assert m == {"system/token_staleness_mean": 0.0, "system/token_staleness_max": 0.0,
                 "system/mixed_version_frac": 0.0}
    assert all(t.extra["version"].sum() == 0 and len(t.response_ids) <= 12 for g in out["groups"] for t in g)
