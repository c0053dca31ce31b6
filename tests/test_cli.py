"""The command line's promise for bad input (issue 13 §3): one line on stderr naming what is wrong and how to fix
it, exit status 2, no traceback. Usage mistakes, OSErrors (run.out_dir a file, a read-only or full disk), a
checkpoint of the wrong kind, and overrides after an option."""
from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlpt.cli import main
from rlpt.config import load_config
from rlpt.preference.dpo import DPOJob
from rlpt.preference.reward_model import RewardModel
from rlpt.run import Run
from rlpt.sft import SFTJob, train_sft

from conftest import SFT_SHAPE, TINY, TOK, model_overrides, tiny_gpt


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A real 2-step SFT run folder (TINY shape: max_seq_len 32)."""
    out = tmp_path_factory.mktemp("runs")
    job = load_config(SFTJob, None, [*TINY, f"run.out_dir={out}", "run.name=base", "sft.steps=2", "sft.ckpt_every=2"])
    _, run, _ = train_sft(job)
    return run.dir


def fails(argv: list[str], capsys) -> str:
    """main(argv) exits 2 with exactly one line on stderr; returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return err.strip()


def test_overrides_may_follow_options(sft_run, capsys):
    assert main(["eval", str(sft_run), "--pass-k", "2", "eval.size=3", "eval.max_tokens=6"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| problems\s+\|\s+3 \|", out) and "pass@2/heldout" in out   # eval.size=3, after --pass-k
    assert main(["eval", str(sft_run), "eval.size=2", "--split", "train", "eval.max_tokens=5"]) == 0
    assert "acc/train" in capsys.readouterr().out


def test_usage_errors_are_one_line(sft_run, capsys):
    assert fails(["eval", str(sft_run), "--pass-k", "-1"], capsys) == \
        "rlpt eval: error: argument --pass-k: expected a whole number >= 0, got -1 (see `rlpt eval --help`)"
    assert "got 'two'" in fails(["eval", str(sft_run), "--pass-k", "two"], capsys)
    assert "unrecognized arguments: '--bogus'" in fails(["eval", str(sft_run), "--bogus", "eval.size=3"], capsys)
    assert "invalid choice: 'bogus'" in fails(["bogus"], capsys)
    assert "unrecognized arguments: 'stray'" in fails(["eval", str(sft_run), "--pass-k", "2", "stray"], capsys)
    assert "required: checkpoint" in fails(["eval"], capsys)
    assert "at most one recipe file" in fails(["sft", "a.yaml", "b.yaml"], capsys)
    huge = "x/" * 1500    # a library may quote the whole path: the line is cut, and says how long it was
    line = fails(["eval", huge], capsys)
    assert len(line) <= 2000 and line.startswith("rlpt eval: error: ") and line.endswith(" chars in all)")


def test_out_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("not a folder")
    line = fails(["sft", *TINY, f"run.out_dir={f}", "sft.steps=1"], capsys)
    assert line.startswith("rlpt sft: error: ") and "Not a directory" in line and repr(str(f / "sft")) in line
    assert f.read_text() == "not a folder"


@pytest.mark.parametrize("code, hint", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "the disk is read-only"),
                                        (errno.EACCES, "no permission")])
def test_os_errors_name_the_path(tmp_path, monkeypatch, capsys, code, hint):
    import rlpt.sft

    def raise_os_error(job, resume=False, **_):
        raise OSError(code, os.strerror(code), str(tmp_path / "x" / "metrics.jsonl"))
    monkeypatch.setattr(rlpt.sft, "train_sft", raise_os_error)
    line = fails(["sft", f"run.out_dir={tmp_path}"], capsys)
    assert line == f"rlpt sft: error: {os.strerror(code)} {str(tmp_path / 'x' / 'metrics.jsonl')!r}: {hint}" + \
        line.split(hint, 1)[1]

    def raise_unnamed(job, resume=False, **_):   # a write() on a full disk names no file: the out_dir is said
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(rlpt.sft, "train_sft", raise_unnamed)
    assert f"{os.strerror(code)} (writing under run.out_dir {str(tmp_path)!r}): {hint}" in \
        fails(["sft", f"run.out_dir={tmp_path}"], capsys)


def test_checkpoint_library_write_failures(tmp_path, monkeypatch, capsys):
    """safetensors and torch.save report a full disk as their own exceptions, not OSError."""
    from safetensors import SafetensorError

    import rlpt.sft
    errors = [SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
              RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 23424 vs 23376")]
    for exc in errors:
        def boom(job, resume=False, exc=exc, **_):
            raise exc
        monkeypatch.setattr(rlpt.sft, "train_sft", boom)
        line = fails(["sft", f"run.out_dir={tmp_path}"], capsys)
        assert line.startswith("rlpt sft: error: writing a checkpoint") and "disk" in line and str(tmp_path) in line

    def bug(job, resume=False, **_):
        raise RuntimeError("a bug, not bad input")
    monkeypatch.setattr(rlpt.sft, "train_sft", bug)
    with pytest.raises(RuntimeError, match="a bug"):   # anything else is not swallowed
        main(["sft", f"run.out_dir={tmp_path}"])


def _mount_tmpfs(path, options: str) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.mark.parametrize("options", ["size=16k", "size=128k", "size=1m,ro"])
def test_real_full_and_read_only_disks(tmp_path, capsys, options):
    """A real tmpfs (needs root): full at the first write, full mid-checkpoint (safetensors or torch.save),
    read-only."""
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, options):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        line = fails(["sft", *TINY, f"run.out_dir={mnt}", "sft.steps=2", "sft.ckpt_every=1"], capsys)
        assert re.search("Read-only file system" if "ro" in options else "disk (is )?full", line), line
        assert str(mnt) in line
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_reward_model_checkpoint_is_not_a_policy(tmp_path, capsys):
    rm = RewardModel(tiny_gpt(), TOK.pad_id)
    run = Run(tmp_path, "rm", load_config(DPOJob, None, []))
    run.save(1, rm, rm.meta(), {"step": 1})
    run.close()
    line = fails(["eval", str(run.dir)], capsys)
    assert "is a reward_model checkpoint, not a policy: start from an SFT or RL run folder" in line
    assert "GPTConfig" not in line


def test_task_longer_than_the_checkpoints_context(sft_run, capsys):
    line = fails(["eval", str(sft_run), "task.max_operands=12", "task.max_value=99"], capsys)
    assert "the longest prompt has 37 tokens" in line and "model.max_seq_len=32" in line


def test_one_pair_rm_file_says_what_is_wrong(sft_run, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "<1+2>", "chosen": "3#", "rejected": "4#"}\n')
    line = fails(["rm", *model_overrides(SFT_SHAPE), f"init_from={sft_run}", f"rm.pairs.file={one}",
                  f"run.out_dir={tmp_path}", "rm.steps=1"], capsys)
    assert f"rm.pairs.file {str(one)!r} holds 1 usable pair" in line and "at least 2" in line
    assert "scored alike" not in line and not (tmp_path / "rm").exists()   # and no run folder left behind
    assert "rm.pairs.heldout_file is only read with rm.pairs.file" in \
        fails(["rm", f"init_from={sft_run}", f"rm.pairs.heldout_file={one}", f"run.out_dir={tmp_path}"], capsys)


def test_meaningless_rl_runs_are_errors(capsys):
    from rlpt.train import load_train_job
    # the README's command: a tool env's SFT start is trained in the tool format, so the policy calls the tool
    job = load_train_job(None, ["env.name=calculator", "steps=20"])
    assert job.sft.format == "tool" and job.env.name == "calculator"
    line = fails(["train", "env.name=calculator", "sft.format=cot"], capsys)
    assert "env.name=calculator needs a policy that uses its tool, but the SFT start (sft.format=cot) never " \
           "shows a tool call: set sft.format=tool" in line
    line = fails(["train", "env.name=code"], capsys)
    assert "env.name=code scores Python programs" in line and "every step skipped" in line


def test_nan_temperature_and_bad_sampling_params():
    from rlpt.engine import SamplingParams
    from rlpt.gpt_mini.generate import SamplingParams as SimpleParams
    for bad in (float("nan"), float("inf"), -1.0, "1"):
        with pytest.raises(ValueError, match="SamplingParams.temperature must be a finite number >= 0"):
            SamplingParams(temperature=bad)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got nan"):
        SimpleParams(temperature=float("nan"))
    with pytest.raises(ValueError, match=r"SamplingParams.n must be an int >= 1, got True"):
        SamplingParams(n=True)
    assert SamplingParams(top_k=-1, stop="#", seed=3).top_k == 0


def test_no_traceback_in_a_real_process(tmp_path):
    """The promise holds for the installed command too (stderr of a real process, not capsys)."""
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"sft:\n  steps: 3 # caf\xe9\n")
    rlpt = Path(sys.executable).parent / "rlpt"   # the venv's console script
    r = subprocess.run([rlpt, "sft", str(bad)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr == f"rlpt sft: error: config file {str(bad)!r} is not UTF-8 text " \
                                             "(byte 0xe9 on line 2): save it as UTF-8\n"


def test_every_resumable_job_takes_allow_change():
    """--resume refuses a changed config unless --allow-change names the keys: every job with --resume has it."""
    from rlpt.cli import build_parser
    parser = build_parser()
    for job in ("sft", "train", "pipeline", "dpo", "rm", "prm", "orm"):
        args = parser.parse_args([job, "--resume", "--allow-change", "a.b,,eval", "x=1"])
        assert args.resume and args.allow_change == ("a.b", "eval") and args.items == ["x=1"], job
