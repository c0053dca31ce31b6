"""PPO with a Hugging Face policy (`rlpt train model.hf_path=... algorithm.name=ppo`): the critic is the HF decoder
+ a value head (rlpt.framework.critic), under LoRA its own adapters on the policy's frozen base.

The start is a tiny gpt_mini after a short CoT SFT, exported once per module (as tests/test_hf_train.py). Checked: 3
PPO steps train with the run-time log-prob check passing, the critic starts as the policy's function and moves,
a resume from step 2 equals the straight run (policy and critic), under LoRA the critic shares the base (no second
copy, none in state.pt) and its state holds its adapters and head only."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("peft")
from rlpt.framework.critic import Critic, capture_hidden  # noqa: E402
from rlpt.models.hf import load_hf_policy  # noqa: E402
from rlpt.models.lora import LoraSpec, apply_lora  # noqa: E402
from rlpt.train import run_train  # noqa: E402

from conftest import HF_FAST, TOK, export_tiny_sft, hf_job  # noqa: E402

FAST = HF_FAST
PPO = ["algorithm.name=ppo", "trainer.epochs=2", "steps=3"]
IDS = torch.tensor([TOK.encode("<12+7+9>28#"), TOK.encode("(1+2)*3=9#x")])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny gpt_mini after 30 CoT SFT steps, exported with `rlpt export` (conftest.export_tiny_sft)."""
    return export_tiny_sft(tmp_path_factory.mktemp("hf_ppo"))


_job = hf_job


def _rows(run) -> list[dict]:
    return [json.loads(r) for r in (run.dir / "metrics.jsonl").read_text().splitlines()]


def _resumed_from_step_2(job) -> object:
    """Run `job` (ckpt_every=2) for 3 steps, cut it back to its step-2 checkpoint, resume -> the resumed Controller."""
    _, run, _ = run_train(job)
    shutil.rmtree(run.dir / "checkpoints" / "step_00000003")
    (run.dir / "checkpoints" / "latest").write_text("step_00000002")
    return run_train(job, resume=True)[0]


def _same_critic(a: Critic, b: Critic) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_critic_of_an_hf_policy_reads_the_decoder_and_shares_a_lora_base(hf_dir):
    full = load_hf_policy(hf_dir)
    critic = Critic(full)
    assert critic.decoder and not critic.base_names                          # full fine-tuning: its own trunk
    assert not any("lm_head" in k for k in critic.state_dict())              # the decoder only
    with torch.no_grad(), capture_hidden(full) as seen:
        full(IDS)
        hidden = critic.trunk(input_ids=IDS, use_cache=False).last_hidden_state
    assert torch.equal(hidden, seen[-1])                                     # what the policy's lm_head reads
    lora = apply_lora(load_hf_policy(hf_dir), LoraSpec(r=4))
    critic = Critic(lora)
    frozen = {p.data_ptr() for p in lora.parameters() if not p.requires_grad}
    assert all(p.data_ptr() in frozen for p in critic.parameters() if not p.requires_grad)   # the base, once
    own = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert own and all("lora_" in n or n.startswith("head.") for n in own)
    assert set(critic.state_dict()) == own                                   # the shared base is not saved
    with torch.no_grad():
        for n, p in critic.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)                                                 # the critic's adapters are its own
        assert torch.equal(lora(IDS), load_hf_policy(hf_dir)(IDS))
    again = Critic(lora)
    again.load_state_dict(critic.state_dict())                               # strict, without the base
    _same_critic(again, critic)
    bad = dict(critic.state_dict())
    bad.pop("head.weight")
    with pytest.raises(RuntimeError, match="head.weight"):
        again.load_state_dict(bad)


def test_rlpt_train_runs_ppo_on_an_hf_policy_with_the_logp_check_and_resumes_exactly(tmp_path, hf_dir):
    """`rlpt train model.hf_path=... algorithm.name=ppo`, then the same run cut back to step 2 and `--resume`d:
    its step-3 checkpoint (policy weights, critic, optimizer moments) equals the straight run's."""
    from safetensors.torch import load_file

    from rlpt.cli import main
    args = ["train", *FAST, f"run.out_dir={tmp_path / 'runs'}", f"model.hf_path={hf_dir}", *PPO, "ckpt_every=2"]
    assert main([*args, "run.name=straight"]) == 0
    run = tmp_path / "runs" / "straight"
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "check/logp_mismatch" in r]
    assert len(rows) == 3 and all(r["step/skipped"] == 0.0 for r in rows)        # PPO has no degenerate groups
    assert all(r["check/logp_mismatch"] < 1e-4 for r in rows)
    assert all("loss/value" in r and "grad/norm_critic" in r for r in rows)
    ck = run / "checkpoints" / "step_00000003"
    critic = torch.load(ck / "state.pt", weights_only=False)["trainer"]["critic"]
    assert critic["head.weight"].abs().sum() > 0 and not any("lm_head" in k for k in critic)   # decoder + head
    start = load_hf_policy(hf_dir).model.model.embed_tokens.weight
    assert not torch.equal(critic["trunk.embed_tokens.weight"], start)            # the critic's trunk trained

    cut = tmp_path / "runs" / "resumed"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000003")
    (cut / "checkpoints" / "latest").write_text("step_00000002")
    assert main([*args, "run.name=resumed", "--resume"]) == 0
    ck_b = cut / "checkpoints" / "step_00000003"
    a, b = load_file(str(ck / "model.safetensors")), load_file(str(ck_b / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(c / "state.pt", weights_only=False)["trainer"] for c in (ck, ck_b))
    assert all(torch.equal(sa["critic"][k], sb["critic"][k]) for k in sa["critic"])
    moments = [(x["exp_avg"], y["exp_avg"]) for x, y in zip(sa["optimizer"]["state"].values(),
                                                            sb["optimizer"]["state"].values())]
    assert moments and all(torch.equal(x, y) for x, y in moments)


def test_ppo_with_lora_trains_adapters_only_and_resumes_exactly(tmp_path, hf_dir):
    lora = ["lora.r=4", "lora.alpha=8", "trainer.optim.lr=5e-3"]
    ctl, run, _ = run_train(_job(tmp_path, hf_dir, *PPO, *lora, "run.name=straight"))
    rows = [r for r in _rows(run) if "check/logp_mismatch" in r]
    assert len(rows) == 3 and all(r["check/logp_mismatch"] < 1e-4 for r in rows)
    policy, critic = ctl.trainer.model, ctl.trainer.critic
    frozen = {p.data_ptr() for p in policy.parameters() if not p.requires_grad}
    assert critic.base_names and all(p.data_ptr() in frozen for p in critic.parameters() if not p.requires_grad)
    base = load_hf_policy(hf_dir)
    shared = {n.replace(".base_layer", ""): p for n, p in critic.trunk.named_parameters() if not p.requires_grad}
    for k, v in base.model.model.named_parameters():                             # the shared base never moved
        assert torch.equal(shared[k], v), k
    moved = [n for n, p in critic.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert moved                                                                 # the critic's adapters trained
    saved = torch.load(run.dir / "checkpoints" / "step_00000003" / "state.pt", weights_only=False)
    assert set(saved["trainer"]["critic"]) == {n for n, p in critic.named_parameters() if p.requires_grad}
    resumed = _resumed_from_step_2(_job(tmp_path, hf_dir, *PPO, *lora, "run.name=resumed", "ckpt_every=2"))
    for (k, a), b in zip(policy.state_dict().items(), resumed.trainer.model.state_dict().values()):
        assert torch.equal(a, b), k
    _same_critic(resumed.trainer.critic, critic)
