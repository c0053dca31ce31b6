"""Run folders and checkpoints: round trips, the `latest` pointer, pruning, and clear errors that
never touch the files they failed on; and issue 13 §1, a run folder never loses data: one process per
folder, no writes into foreign folders, saves a kill cannot break, checksums, metrics, signals, config
changes on --resume, non-finite steps (docs/reliability.md lists each promise beside its test)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from rlpt.checkpoint import (
    CheckpointError,
    checkpoint_problem,
    finished_checkpoint,
    latest_checkpoint,
    load_state,
    load_weights,
    read_checkpoint_meta,
    resolve_checkpoint,
    signals_deferred,
)
from rlpt.cli import main
from rlpt.config import ConfigError, ModelConfig, load_config
from rlpt.gpt_mini.model import load_model, make_model
from rlpt.loop import SupervisedLoop, train_loop
from rlpt.preference.dpo import DPOJob, run_dpo
from rlpt.run import LOCK, Run, RunFolderError, StopRequested, read_metrics
from rlpt.sft import SFTJob, train_sft

from conftest import SFT_SHAPE, TOK, model_overrides


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


JOB = load_config(SFTJob, None, ["run.progress=false"])


def model_and_run(tmp_path, tie: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = make_model(ModelConfig(**SFT_SHAPE, tie_embeddings=tie), TOK)
    return model, Run(tmp_path, "r", JOB)


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


# -- issue 13 §1: a run folder never loses data ----------------------------------------------------------
def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def bump(model, by: float = 1.0) -> None:
    with torch.no_grad():
        model.embed.weight.add_(by)


def test_pruning_by_step_number_never_drops_the_newest(tmp_path):
    model, run = model_and_run(tmp_path)
    # by name step_100000000 sorts before step_99999999: pruning by sorted name deleted the one just saved
    run.save(99_999_999, model, model.cfg.to_dict(), {"step": 99_999_999}, keep=1)
    run.save(100_000_000, model, model.cfg.to_dict(), {"step": 100_000_000}, keep=1)
    assert sorted(p.name for p in run.ckpt_dir.iterdir()) == ["latest", "step_100000000"]
    assert load_state(latest_checkpoint(run.dir))["step"] == 100_000_000


def test_resume_to_fewer_steps_than_done_is_an_error(tmp_path, tiny_job):
    train_sft(tiny_job("sft.steps=4", "sft.ckpt_every=2", "run.name=a"))
    folder = Path(tiny_job().run.out_dir) / "a"
    before = snapshot(folder)
    with pytest.raises(ConfigError, match=r"is at step 4, past this job's 2 steps: resume with at least 4 steps"):
        train_sft(tiny_job("sft.steps=2", "sft.ckpt_every=2", "run.name=a"), resume=True, allow_change=["sft.steps"])
    assert snapshot(folder) == before                                     # config.yaml not rewritten
    assert load_state(latest_checkpoint(folder))["step"] == 4


def test_a_kill_after_the_last_save_still_finishes_the_job(tiny_job, monkeypatch):
    """The closing phase (final evaluation, its metrics row) belongs to the job: a run killed after its last
    save is not finished, and a resume logs that row once, also when it resumes a finished run."""
    import rlpt.sft
    _, straight, _ = train_sft(tiny_job("sft.steps=2", "run.name=a"))
    job = tiny_job("sft.steps=2", "run.name=b")
    folder = Path(job.run.out_dir) / "b"
    real = rlpt.sft.evaluate

    def dies_in_the_final_eval(*a, k=0, **kw):
        if k:
            raise RuntimeError("killed")
        return real(*a, k=k, **kw)
    monkeypatch.setattr(rlpt.sft, "evaluate", dies_in_the_final_eval)
    with pytest.raises(RuntimeError, match="killed"):
        train_sft(job)
    monkeypatch.undo()
    assert latest_checkpoint(folder).name == "step_00000002" and finished_checkpoint(folder, 2) is None
    for _ in range(2):
        train_sft(job, resume=True)
        assert finished_checkpoint(folder, 2) == folder / "checkpoints" / "step_00000002"
        assert strip_time(straight.read_metrics()) == strip_time(read_metrics(folder / "metrics.jsonl"))


def strip_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_one_process_per_run_folder(tmp_path):
    job = load_config(SFTJob, None, [])
    first = Run(tmp_path, "r", job)
    assert (first.dir / LOCK).read_text() == f"{os.getpid()}\n"
    with pytest.raises(RunFolderError, match=rf"in use by another rlpt process \(PID {os.getpid()}\)"):
        Run(tmp_path, "r", job, resume=True)
    first.close()
    assert (first.dir / LOCK).read_text() == ""                           # a clean exit leaves no PID
    Run(tmp_path, "r", job, resume=True).close()


def test_a_killed_runs_lock_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "r"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(folder / LOCK)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write(f'{os.getpid()}\\n'); f.flush(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        job = load_config(SFTJob, None, [])
        with pytest.raises(RunFolderError, match=rf"\(PID {holder.pid}\)"):
            Run(tmp_path, "r", job, resume=True)
    finally:
        holder.kill()
        holder.wait()
    run = Run(tmp_path, "r", job, resume=True)                            # the kernel dropped the dead one's flock
    assert f"took over the lock of PID {holder.pid}, which no longer runs" in capsys.readouterr().out
    assert (folder / LOCK).read_text() == f"{os.getpid()}\n"
    run.close()


def test_never_writes_into_a_folder_that_is_not_a_run(tmp_path):
    job = load_config(SFTJob, None, [])
    project = tmp_path / "project"                      # `run.name=.` in a project folder
    (project / "tb").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "tb/events"):
        (project / name).write_text("mine")
    before = snapshot(tmp_path)
    for resume in (False, True):
        with pytest.raises(RunFolderError, match=r"holds files and is not an rlpt run folder .*nothing was changed"):
            Run(tmp_path, "project", job, resume=resume)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"run folder .*afile' is a file"):
        Run(tmp_path, "afile", job)
    assert snapshot(tmp_path) == {**before, "afile": b"x"}
    # an empty folder is fine; in an rlpt folder a fresh start removes only what rlpt wrote
    (tmp_path / "empty").mkdir()
    run = Run(tmp_path, "empty", job)
    run.log(1, {"loss": 1.0})
    (run.dir / "notes.txt").write_text("my notes")
    run.close()
    Run(tmp_path, "empty", job).close()
    assert sorted(p.name for p in run.dir.iterdir()) == ["notes.txt", LOCK]


def test_a_failed_command_leaves_no_new_folder(tmp_path, tiny_job):
    job = tiny_job("sft.steps=1", "run.name=first")
    _, run, _ = train_sft(job)
    runs = run.dir.parent
    before = snapshot(runs)
    with pytest.raises(CheckpointError):                  # fails while building the model: no folder yet
        train_sft(tiny_job("run.name=second", f"init_from={run.dir}", "model.n_layer=3"))
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "<1+2>", "chosen": "3#"}\n')   # no "rejected"
    dpo_job = load_config(DPOJob, None, [*model_overrides(SFT_SHAPE), f"run.out_dir={runs}", "run.name=dpo",
                                         f"init_from={run.dir}", f"dpo.pairs.file={bad}", "eval.size=2"])
    with pytest.raises(ConfigError, match="rejected"):     # fails after its folder was made: removed again
        run_dpo(dpo_job)
    assert snapshot(runs) == before


def test_kill_at_any_point_of_a_save_loses_nothing(tmp_path, monkeypatch):
    """A kill after every file operation of a save (first save and re-save of a step): start-up recovers a
    checkpoint that verifies, with the old or the new weights, and leaves no hidden leftovers."""
    real_replace, real_rmtree = os.replace, shutil.rmtree

    class Killed(BaseException):
        pass

    for resave in (False, True):
        for k in range(1, 10):
            model, run = model_and_run(tmp_path / f"{resave}{k}")
            run.save(1, model, model.cfg.to_dict(), {"step": 1})
            if resave:
                run.save(2, model, model.cfg.to_dict(), {"step": 2})
            old = weights(model)
            bump(model)
            calls = []

            def dies(*a, real=None, calls=calls, k=k, **kw):
                calls.append(1)
                if len(calls) == k:
                    raise Killed
                return real(*a, **kw)

            monkeypatch.setattr(os, "replace", lambda *a, **kw: dies(*a, real=real_replace, **kw))
            monkeypatch.setattr(shutil, "rmtree", lambda *a, **kw: dies(*a, real=real_rmtree, **kw))
            try:
                run.save(2, model, model.cfg.to_dict(), {"step": 2})
                killed = False
            except Killed:
                killed = True
            monkeypatch.undo()
            run.close()
            again = Run(run.dir.parent, "r", JOB, resume=True)
            ck = again.resume_from
            assert checkpoint_problem(ck) is None and latest_checkpoint(again.dir) == ck
            fresh = make_model(ModelConfig(**SFT_SHAPE), TOK)
            load_weights(ck, fresh)
            got = weights(fresh)
            assert all(torch.equal(got[n], old[n]) for n in got) or all(torch.equal(got[n], model.state_dict()[n])
                                                                        for n in got)
            assert not [p.name for p in again.ckpt_dir.iterdir() if p.name.startswith(".") or p.name.endswith("tmp")]
            again.close()
            if not killed:
                break
    assert k >= 5    # the re-save was cut at every one of its renames and removals before it completed


def test_half_written_and_legacy_leftovers(tmp_path):
    model, run = model_and_run(tmp_path)
    run.save(1, model, model.cfg.to_dict(), {"step": 1})
    (run.ckpt_dir / ".tmp-step_00000002").mkdir()                       # killed mid-write: no manifest
    (run.ckpt_dir / ".tmp-step_00000002" / "model.safetensors").write_bytes(b"half")
    shutil.copytree(run.ckpt_dir / "step_00000001", run.ckpt_dir / ".old-step_00000003-4242")   # rlpt before 13
    (run.ckpt_dir / "latest").write_text("step_00000003")
    run.close()
    again = Run(tmp_path, "r", JOB, resume=True)
    assert sorted(p.name for p in again.ckpt_dir.iterdir()) == ["latest", "step_00000001", "step_00000003"]
    assert again.resume_from == again.ckpt_dir / "step_00000003"
    again.close()


def test_corrupt_newest_checkpoint_falls_back(tmp_path, capsys):
    model, run = model_and_run(tmp_path)
    run.save(3, model, model.cfg.to_dict(), {"step": 3})
    good = weights(model)
    bump(model)
    run.save(6, model, model.cfg.to_dict(), {"step": 6})
    f = run.ckpt_dir / "step_00000006" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01                                                     # one flipped bit in a weight
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors' \(truncated or corrupt\?\): model.safetensors "
                                              r"does not match the sha256 in manifest.json"):
        load_model(run.ckpt_dir / "step_00000006")
    run.close()
    again = Run(tmp_path, "r", JOB, resume=True)
    out = capsys.readouterr().out
    assert "warning: checkpoint step_00000006 (model.safetensors does not match the sha256" in out
    assert "resuming from step_00000003, the newest good one" in out
    assert again.resume_from == again.ckpt_dir / "step_00000003"
    assert (again.ckpt_dir / "latest").read_text() == "step_00000003"
    assert (again.ckpt_dir / "corrupt-step_00000006").is_dir()          # kept for a look
    assert all(torch.equal(load_model(again.resume_from).state_dict()[k], v) for k, v in good.items())
    (again.ckpt_dir / "step_00000003" / "state.pt").write_bytes(b"junk")
    again.close()
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*step_00000003 \(state.pt does not match"):
        Run(tmp_path, "r", JOB, resume=True)


def test_metrics_keep_complete_lines_and_restart_clean(tmp_path):
    model, run = model_and_run(tmp_path)
    for s in (1, 2, 3):
        run.log(s, {"loss/sft": float(s), "tag": "x"})
    run.save(2, model, model.cfg.to_dict(), {"step": 2})
    run.close()
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 4, "loss/s')                                  # a kill mid-write
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    again = Run(tmp_path, "r", JOB, resume=True)
    again.truncate_metrics(2)                                            # what restore_training does
    assert again.metrics_path.read_text() == ('{"step": 1, "loss/sft": 1.0, "tag": "x"}\n'
                                              '{"step": 2, "loss/sft": 2.0, "tag": "x"}\n')
    again.close()
    # killed before its first checkpoint: the resumed run's metrics start clean (not 1, 2, 1, 2, ...)
    _, early = model_and_run(tmp_path / "early")
    early.log(1, {"loss": 1.0})
    early.close()
    assert Run(tmp_path / "early", "r", JOB, resume=True).read_metrics() == []


def test_changed_config_on_resume_is_refused_unless_allowed(tmp_path, tiny_job, capsys):
    job = tiny_job("sft.steps=2", "run.name=a")
    train_sft(job)
    folder = Path(job.run.out_dir) / "a"
    before = snapshot(folder)
    changed = ("sft.steps=3", "sft.optim.lr=0.01", "run.seed=7", "eval.size=4", "run.progress=true")
    with pytest.raises(ConfigError, match=r"differs from .*config.yaml': eval.size: 8 -> 4; run.seed: 0 -> 7; "
                                          r"sft.optim.lr: 0.003 -> 0.01; sft.steps: 2 -> 3\. .*--allow-change "
                                          r"eval.size,run.seed,sft.optim.lr,sft.steps to continue"):
        train_sft(tiny_job("run.name=a", *changed), resume=True)
    with pytest.raises(ConfigError, match=r"differs .*: run.seed: 0 -> 7\."):   # a section allows all its keys
        train_sft(tiny_job("run.name=a", *changed), resume=True, allow_change=["sft", "eval"])
    assert snapshot(folder) == before                                     # config.yaml untouched
    train_sft(tiny_job("run.name=a", *changed), resume=True, allow_change=["sft", "eval", "run.seed"])
    assert "sft.steps changes from 2 to 3 (allowed)" in capsys.readouterr().out
    assert load_config(SFTJob, folder / "config.yaml").run.seed == 7    # it records what the run now uses


def test_a_key_newer_than_the_run_folder_is_no_change_at_its_default(tmp_path, tiny_job):
    """A folder written before rlpt had a key (here: sft.optim.weight_decay deleted from its config.yaml) resumes
    without --allow-change when the key keeps its default, and is refused when the resume sets another value."""
    job = tiny_job("sft.steps=2", "run.name=a")
    train_sft(job)
    saved = Path(job.run.out_dir) / "a" / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["sft"]["optim"]["weight_decay"]
    saved.write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.raises(ConfigError, match=r"differs .*: sft.optim.weight_decay: None -> 0.1\. "):
        train_sft(tiny_job("sft.steps=2", "run.name=a", "sft.optim.weight_decay=0.1"), resume=True)
    train_sft(tiny_job("sft.steps=2", "run.name=a"), resume=True)   # the default: the run used it


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    from rlpt.config import SFTConfig
    model, run = model_and_run(tmp_path)
    cfg = SFTConfig(steps=3, log_every=3)
    loop = SupervisedLoop(run, None, model, cfg, seed=0)
    x = torch.randint(1, 24, (2, 8))
    losses = iter([1.0, float("nan"), float("inf")])

    def loss_fn(rng):
        loss = model(x).float().pow(2).mean() * next(losses)
        return loss, {"loss/test": loss.detach()}

    assert loop.step(0, loss_fn) == {}
    after_first, adam = weights(model), {k: v.clone() for k, v in loop.opt.state_dict()["state"][0].items()}
    assert loop.step(1, loss_fn) == {}                                   # NaN loss: no update
    row = loop.step(2, loss_fn)                                          # inf loss: no update
    assert all(torch.equal(model.state_dict()[k], v) for k, v in after_first.items())
    assert all(torch.equal(loop.opt.state_dict()["state"][0][k], v) for k, v in adam.items())
    assert row["step/nonfinite"] == 2 and loop.nonfinite == 0 and loop.sched.last_epoch == 3


def test_non_finite_weights_are_never_saved(tmp_path):
    model, run = model_and_run(tmp_path)
    run.save(1, model, model.cfg.to_dict(), {"step": 1})
    before = snapshot(run.ckpt_dir)
    with torch.no_grad():
        model.layers[0].mlp.gate_proj.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"not saving step_00000002: the weights hold NaN or inf "
                                              r"\(layers.0.mlp.gate_proj.weight\)"):
        run.save(2, model, model.cfg.to_dict(), {"step": 2})
    assert snapshot(run.ckpt_dir) == before



def test_a_save_that_fails_on_a_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    model, run = model_and_run(tmp_path)
    run.save(1, model, model.cfg.to_dict(), {"step": 1})
    before = snapshot(run.ckpt_dir)

    def full_disk(obj, f, *a, **kw):
        open(f, "wb").write(b"half")                                    # what a full disk leaves: a partial file
        raise OSError(28, "No space left on device", str(f))
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run.save(2, model, model.cfg.to_dict(), {"step": 2})
    assert snapshot(run.ckpt_dir) == before                             # no .tmp-step_00000002, step 1 whole
    assert latest_checkpoint(run.dir).name == "step_00000001"

# -- signals ----------------------------------------------------------------------------------------------
def signalled_loop(tmp_path, monkeypatch, at_step: dict[int, list[int]], in_save: dict[int, list[int]], total=4):
    """train_loop over `total` steps of a tiny model, sending the signals at_step[s] during step s and
    in_save[s] in the middle of the save of step s (from inside torch.save). Returns the run."""
    model, run = model_and_run(tmp_path)
    real_save = torch.save

    def save_fn(step):
        def slow_save(*a, **kw):
            for sig in in_save.get(step, []):
                os.kill(os.getpid(), sig)
                sum(range(1000))                                         # a bytecode boundary for the handler
            real_save(*a, **kw)
        monkeypatch.setattr(torch, "save", slow_save)
        try:
            return run.save(step, model, model.cfg.to_dict(), {"step": step})
        finally:
            monkeypatch.setattr(torch, "save", real_save)

    def step_fn(step):
        bump(model, 0.01)
        for sig in at_step.get(step, []):
            os.kill(os.getpid(), sig)
            sum(range(1000))
        return {}

    train_loop(run, 0, total, step_fn, dict, save_fn, eval_every=100, ckpt_every=100, progress=False)
    return run


def test_sigterm_is_a_first_ctrl_c(tmp_path, monkeypatch, capsys):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(StopRequested, match=r"interrupted at step 2: saved .*step_00000002; continue with --resume"):
        signalled_loop(tmp_path, monkeypatch, {1: [signal.SIGTERM]}, {})
    assert "[rlpt] SIGTERM: finishing this step, then saving a checkpoint" in capsys.readouterr().out
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text() == "step_00000002"
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_a_second_signal_stops_at_once(tmp_path, monkeypatch):
    with pytest.raises(StopRequested, match="stopped at once by a second Ctrl-C"):
        signalled_loop(tmp_path, monkeypatch, {1: [signal.SIGINT, signal.SIGINT]}, {})
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_ctrl_c_during_the_final_save_keeps_the_run(tmp_path, monkeypatch):
    with pytest.raises(StopRequested, match=r"interrupted after the last step: saved .*step_00000004"):
        signalled_loop(tmp_path, monkeypatch, {}, {4: [signal.SIGINT]})
    ck = tmp_path / "r" / "checkpoints" / "step_00000004"
    assert checkpoint_problem(ck) is None and load_state(ck)["step"] == 4
    # two Ctrl-C during a save: the save still completes, then the run stops
    with pytest.raises(StopRequested, match="stopped at once by a second Ctrl-C"):
        signalled_loop(tmp_path / "b", monkeypatch, {1: [signal.SIGINT]}, {2: [signal.SIGINT]})
    assert latest_checkpoint(tmp_path / "b" / "r").name == "step_00000002"
    assert checkpoint_problem(tmp_path / "b" / "r" / "checkpoints" / "step_00000002") is None
    # with no handler of rlpt's (the reward model's final re-save), Ctrl-C waits for the save too
    model, run = model_and_run(tmp_path / "c")
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))
            run.save(1, model, model.cfg.to_dict(), {"step": 1})
    assert checkpoint_problem(run.ckpt_dir / "step_00000001") is None


def test_ctrl_c_at_start_up_is_one_line(tmp_path, monkeypatch, capsys):
    import rlpt.sft

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(rlpt.sft, "make_model", interrupted)
    assert main(["sft", f"run.out_dir={tmp_path}", "run.progress=false"]) == 130
    err = capsys.readouterr().err
    assert err == "rlpt sft: interrupted by Ctrl-C; --resume continues from the last checkpoint saved, if any\n"
    assert list(tmp_path.iterdir()) == []
