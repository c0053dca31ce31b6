"""The Ray topologies with a Hugging Face policy (`system.topology=... model.hf_path=...`): each actor loads the
policy from model.hf_path itself, a sync moves the HF parameters (under LoRA the `lora.sync` payload) and is checked
by digest.

disaggregated (η = 0) on the `rlpt export`ed gpt_mini gives the in-process Controller's metrics over 3 GRPO steps
(as tests/test_systems_ray.py for gpt_mini); a LoRA run under one_step_off through `rlpt train` passes the log-prob
check with adapter-only syncs. A local Ray (~10 s to start) and two actors per run that import torch, transformers
and peft (~5 s each): those two are `slow`. Without Ray: a transport carrying the LoRA payload between two separately
loaded copies (as two processes hold them) lands the adapters only, digest-checked."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("peft")
from rlpt.models.hf import load_hf_policy  # noqa: E402
from rlpt.models.lora import LoraSpec, adapter_payload, apply_lora, merged_payload, rollout_copy  # noqa: E402
from rlpt.systems.transport import Payload, WeightSyncError, digest, make_transport  # noqa: E402
from rlpt.train import build, run_train  # noqa: E402

from conftest import HF_FAST, TOK, export_tiny_sft, hf_job  # noqa: E402

FAST = HF_FAST
NOT_COMPARED = ("time/", "mem/", "timeline/", "system/")


@pytest.fixture(scope="module")
def ray_up():
    ray = pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if not ray.is_initialized():   # 4 logical CPUs, as tests/test_systems_ray.py asks (the first file up starts it)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny gpt_mini after 30 CoT SFT steps, exported with `rlpt export` (conftest.export_tiny_sft)."""
    return export_tiny_sft(tmp_path_factory.mktemp("hf_ray"))


_job = hf_job


def _compared(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith(NOT_COMPARED)}


@pytest.mark.parametrize("sync", ["adapters", "merged"])
def test_a_lora_payload_crosses_a_transport_between_separate_copies(hf_dir, sync):
    """Trainer and rollout loaded apart (no shared storage, as in two actors): the transport moves the lora.sync
    payload only, the rollout then computes the trainer's logits exactly, and the digest covers what moved; a
    corrupted digest and a payload naming a tensor the rollout lacks are WeightSyncErrors."""
    spec = LoraSpec(r=4, alpha=8)
    payload = adapter_payload if sync == "adapters" else merged_payload
    trainer = apply_lora(load_hf_policy(hf_dir), spec)
    rollout = rollout_copy(apply_lora(load_hf_policy(hf_dir), spec), sync)
    with torch.no_grad():
        for n, p in trainer.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    ids = torch.tensor([TOK.encode("<12+7+9>28#")])
    send, receive = make_transport("in_process", payload=payload), make_transport("in_process", payload=payload)
    sent = send.publish(trainer, version=3)
    assert sent.data.keys() == payload(trainer).keys() and sent.digest == digest(payload(trainer))
    moved = sum(t.numel() for t in sent.data.values())
    assert (moved == sum(p.numel() for p in trainer.parameters() if p.requires_grad)) == (sync == "adapters")
    assert receive.apply(sent, rollout) == 3
    with torch.no_grad():
        if sync == "adapters":
            assert torch.equal(rollout(ids), trainer(ids))
        else:
            torch.testing.assert_close(rollout(ids), trainer(ids), atol=1e-5, rtol=0)
    with pytest.raises(WeightSyncError, match="version 4 failed its check"):
        receive.apply(Payload(4, "0" * 64, sent.data), rollout)
    with pytest.raises(WeightSyncError, match="lacks.*nowhere"):
        receive.apply(Payload(5, None, {"nowhere.weight": torch.zeros(1)}), rollout)


@pytest.mark.slow
def test_disaggregated_hf_policy_equals_in_process(ray_up, tmp_path, hf_dir):
    """η = 0 on actors = the in-process Controller over 3 GRPO steps (same seeds) to 1e-6 on every metric, the
    trainer's weights equal bit for bit, every sync verified by digest."""
    from rlpt.systems.runner import RaySystem
    job = _job(tmp_path, hf_dir, "system.topology=disaggregated", "steps=3")
    init = hf_dir
    torch.manual_seed(job.run.seed)
    ctl, _ = build(job, init)
    local = [ctl.step() for _ in range(3)]
    assert sum(m["step/skipped"] == 0 for m in local) >= 1             # the comparison covers real training
    torch.manual_seed(job.run.seed)
    sys_ = RaySystem(job, build, init)
    try:
        got = [sys_.step() for _ in range(3)]
        for i, (a, b) in enumerate(zip(local, got)):
            a, b = _compared(a), _compared(b)
            assert a.keys() == b.keys(), (i, sorted(a.keys() ^ b.keys()))
            for k in a:
                assert abs(a[k] - b[k]) <= 1e-6 if not isinstance(a[k], list) else a[k] == b[k], (i, k, a[k], b[k])
            assert got[i]["system/staleness_max"] == 0
        assert type(sys_.trainer.model.model).__name__ == "LlamaForCausalLM"
        assert digest(sys_.trainer.model) == digest(ctl.trainer.model)
        trained = sum(m.get("sync/done", 0) for m in got)
        assert trained >= 1 and len(sys_.sync_log) == trained
        full = sum(p.numel() * 4 for p in ctl.trainer.model.parameters())        # every parameter, fp32 (tied once)
        assert [m["system/sync_bytes"] for m in got] == [full * m.get("sync/done", 0) for m in got]
        assert all(e["worker_digests"] == [e["digest"]] for e in sys_.sync_log)
        assert digest(ctl.rollout.model) == ray_up.get(sys_.workers[0].digest.remote())   # the rollout copies too
    finally:
        sys_.close()


@pytest.mark.slow
def test_lora_one_step_off_through_rlpt_train_syncs_the_adapters(ray_up, tmp_path, hf_dir):
    """`rlpt train ... lora.r=4 system.topology=one_step_off`: 3 steps finish with the log-prob check passing on the
    steps that train on fresh weights, every sync moves the adapters only (the digest is theirs) and is verified."""
    job = _job(tmp_path, hf_dir, "system.topology=one_step_off", "steps=3", "lora.r=4", "lora.alpha=8",
               "trainer.optim.lr=5e-3")
    sys_, run, _ = run_train(job)
    rows = [r for r in run.read_metrics() if "system/staleness_max" in r]
    assert len(rows) == 3 and rows[0]["system/staleness_max"] == 0
    checked = [r for r in rows if "check/logp_mismatch" in r]
    assert checked and all(r["check/logp_mismatch"] < 1e-4 for r in checked)
    assert sys_.syncs >= 1 and all(e["worker_digests"] == [e["digest"]] for e in sys_.sync_log)
    policy = sys_.trainer.model
    adapters = {n: p.detach() for n, p in policy.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert sys_.sync_log[-1]["digest"] == digest(adapters)           # the last sync moved exactly the adapters
    synced = [r["system/sync_bytes"] for r in rows if r["system/sync_bytes"]]
    assert synced and set(synced) == {sum(p.numel() * 4 for p in adapters.values())}
    assert any(p.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)   # pulled from the trainer actor
