"""Run folders and checkpoints: round trips, the `latest` pointer, pruning, and clear errors that
never touch the files they failed on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rlpt.config import ModelConfig, load_config
from rlpt.gpt_mini.model import load_model, make_model
from rlpt.run import (
    CheckpointError,
    Run,
    latest_checkpoint,
    load_state,
    load_weights,
    read_checkpoint_meta,
    resolve_checkpoint,
)
from rlpt.sft import SFTJob, train_sft

from conftest import SFT_SHAPE, TOK


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def model_and_run(tmp_path, tie: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = make_model(ModelConfig(**SFT_SHAPE, tie_embeddings=tie), TOK)
    job = load_config(SFTJob, None, ["run.progress=false"])
    return model, Run(tmp_path, "r", job)


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie):
    model, run = model_and_run(tmp_path, tie)
    state = {"step": 3, "extra": [1, 2.5], "t": torch.arange(4)}
    path = run.save(3, model, model.cfg.to_dict(), state)
    assert path == run.ckpt_dir / "step_00000003" and (path / "model.safetensors").is_file()
    assert read_checkpoint_meta(path) == model.cfg.to_dict()
    loaded = load_model(path)
    assert loaded.cfg == model.cfg
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got = load_state(path)
    assert got["step"] == 3 and got["extra"] == [1, 2.5] and torch.equal(got["t"], state["t"])
    # loading into an existing model of the same shape
    other = make_model(ModelConfig(**SFT_SHAPE, tie_embeddings=tie), TOK)
    load_weights(path, other)
    assert all(torch.equal(other.state_dict()[k], a[k]) for k in a)
    ids = torch.randint(1, 24, (2, 9))
    assert torch.equal(other(ids), model(ids))
    # expect= with the very same config passes
    load_model(path, expect=ModelConfig(**SFT_SHAPE, tie_embeddings=tie))


def test_latest_pointer_and_pruning(tmp_path):
    model, run = model_and_run(tmp_path)
    assert run.latest_checkpoint() is None
    for step in (10, 20, 30, 40, 50):
        run.save(step, model, model.cfg.to_dict(), {"step": step}, keep=3)
        assert (run.ckpt_dir / "latest").read_text() == f"step_{step:08d}"
        assert latest_checkpoint(run.dir) == run.ckpt_dir / f"step_{step:08d}"
    names = sorted(p.name for p in run.ckpt_dir.iterdir())
    assert names == ["latest", "step_00000030", "step_00000040", "step_00000050"]   # no tmp leftovers
    assert resolve_checkpoint(run.dir) == run.ckpt_dir / "step_00000050"
    assert resolve_checkpoint(run.ckpt_dir / "step_00000040") == run.ckpt_dir / "step_00000040"
    assert load_state(run.dir / "checkpoints" / "step_00000040")["step"] == 40
    assert load_model(run.dir).cfg == model.cfg                      # a run folder means its latest
    # saving the same step again replaces it in place
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    run.save(50, model, model.cfg.to_dict(), {"step": 50}, keep=3)
    assert torch.equal(load_model(run.dir).embed.weight, model.embed.weight)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        read_checkpoint_meta(tmp_path / "nothing")


def test_truncated_weights(tmp_path):
    model, run = model_and_run(tmp_path)
    path = run.save(1, model, model.cfg.to_dict(), {"step": 1})
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_model(path)
    assert str(f) in str(e.value)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_weights(path, model)
    assert snapshot(tmp_path) == before


def test_truncated_state(tmp_path):
    model, run = model_and_run(tmp_path)
    path = run.save(1, model, model.cfg.to_dict(), {"step": 1, "big": torch.zeros(1000)})
    f = path / "state.pt"
    f.write_bytes(f.read_bytes()[:200])
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"cannot read training state .*state.pt"):
        load_state(path)
    assert snapshot(tmp_path) == before


def test_foreign_safetensors(tmp_path):
    ck = tmp_path / "foreign"
    ck.mkdir()
    save_file({"embed.weight": torch.zeros(24, 32)}, str(ck / "model.safetensors"))
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"not an rlpt checkpoint.*rlpt.models.hf"):
        load_model(ck)
    assert snapshot(tmp_path) == before
    save_file({"w": torch.zeros(2)}, str(ck / "model.safetensors"), metadata={"format": "pt"})
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="format='pt'"):
        load_model(ck)
    assert snapshot(tmp_path) == before
    (ck / "model.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(ck)
    assert snapshot(tmp_path) == {"foreign/model.safetensors": b"definitely not safetensors"}


def test_different_shape_names_key(tmp_path):
    model, run = model_and_run(tmp_path)
    path = run.save(1, model, model.cfg.to_dict(), {"step": 1})
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_model(path, expect=ModelConfig(**{**SFT_SHAPE, "d_model": 64}))
    msg = str(e.value)
    assert "model.d_model: checkpoint 32 vs config 64" in msg and "n_layer" not in msg
    with pytest.raises(CheckpointError, match=r"model.n_kv_head: checkpoint 2 vs config 4.*"
                                              r"model.tie_embeddings: checkpoint True vs config False"):
        load_model(path, expect=ModelConfig(**{**SFT_SHAPE, "n_kv_head": 4, "tie_embeddings": False}))
    # loading weights into a differently shaped model: the mismatching tensor is named
    wide = make_model(ModelConfig(**{**SFT_SHAPE, "d_ff": 96}), TOK)
    wide_before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"shape mismatch: .*mlp.gate_proj.weight: checkpoint \(64, 32\) "
                                              r"vs model \(96, 32\)"):
        load_weights(path, wide)
    assert all(torch.equal(wide.state_dict()[k], v) for k, v in wide_before.items())   # untouched
    deeper = make_model(ModelConfig(**{**SFT_SHAPE, "n_layer": 3}), TOK)
    with pytest.raises(CheckpointError, match=r"missing: layers\.2\."):
        load_weights(path, deeper)
    assert snapshot(tmp_path) == before


def test_new_run_over_checkpoints_refused(tmp_path, tiny_job):
    job = tiny_job("sft.steps=2", "run.name=a")
    train_sft(job)
    folder = Path(job.run.out_dir) / "a"
    before = snapshot(folder)
    assert "checkpoints/latest" in before and "metrics.jsonl" in before
    with pytest.raises(FileExistsError, match=r"already holds checkpoints.*--resume.*nothing was changed"):
        train_sft(tiny_job("sft.steps=5", "run.name=a", "model.n_layer=1"))
    with pytest.raises(FileExistsError):
        Run(job.run.out_dir, "a", job)
    assert snapshot(folder) == before


def test_resume_truncates_metrics(tmp_path):
    job = load_config(SFTJob, None, ["run.progress=false"])
    run = Run(tmp_path, "m", job)
    for s in (1, 2, 3, 4):
        run.log(s, {"loss/sft": float(s), "tag": "x"})
    run.close()
    again = Run(tmp_path, "m", job, resume=True)
    again.truncate_metrics(2)
    assert again.read_metrics() == [{"step": 1, "loss/sft": 1.0, "tag": "x"}, {"step": 2, "loss/sft": 2.0, "tag": "x"}]
    again.close()
    json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[-1])
    # a fresh (non-resume) run in a folder without checkpoints starts its metrics over
    Run(tmp_path, "m", job).close()
    assert not (tmp_path / "m" / "metrics.jsonl").exists()
