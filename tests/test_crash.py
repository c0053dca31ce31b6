"""Issue 13 §1 end to end: `rlpt train` killed with SIGKILL at 20 random moments (in imports, training,
evaluation, checkpoint writes, the report), each time resumed in the same run folder, ends with the very
weights and metrics of an uninterrupted run; and two runs on one folder cannot both proceed.

Importing torch and rlpt takes 2-6 s per process here, so the killed processes come from a zygote: one
process that has imported rlpt once and forks a child per try, which runs exactly `rlpt train`'s
`rlpt.cli.main` and is SIGKILLed. The uninterrupted reference, the final resume and the concurrent second
run are ordinary `python -m rlpt.cli` processes.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlpt.checkpoint import latest_checkpoint
from rlpt.gpt_mini.model import load_model
from rlpt.run import LOCK, read_metrics

from conftest import model_overrides

ROOT = Path(__file__).parents[1]
# the tiniest RL job that still trains: an SFT start (chain of thought, 8 steps) and 30 GRPO steps, a
# checkpoint after every step of both, so kills land in checkpoint writes too (a step is ~0.1 s of ~6 s)
STEPS = 30
JOB = [*model_overrides(dict(n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=32, max_seq_len=48)),
       "sft.steps=8", "sft.batch_size=8", "sft.format=cot", "sft.ckpt_every=1", "sft.log_every=1",
       "rollout.k=4", "rollout.prompts_per_step=4", "rollout.max_tokens=16", "eval.size=4", "eval.every=10",
       "task.max_operands=3", "trainer.optim.lr=1e-2", f"steps={STEPS}", "ckpt_every=1", "run.progress=false",
       "run.threads=1"]
KILLS = 20

ZYGOTE = r"""
import json, os, sys, traceback
# what a child imports (lazily, some of it on its first optimizer step or plot), imported once here
import rlpt.cli, rlpt.train, rlpt.report, rlpt.perf.cli, rlpt.search.cli, torch.utils.tensorboard, torch._dynamo
import matplotlib.pyplot, PIL.Image
for line in sys.stdin:
    cmd, arg = json.loads(line)
    if cmd == "run":                           # arg: [argv, log file]
        pid = os.fork()
        if pid == 0:
            fd = os.open(arg[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            try:
                rc = rlpt.cli.main(arg[0])
            except BaseException:
                traceback.print_exc()
                rc = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        print(pid, flush=True)
    else:                                      # "wait": arg is a pid; answer its raw wait status
        print(os.waitpid(arg, 0)[1], flush=True)
"""


class Zygote:
    def __init__(self, cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=cwd, env=dict(os.environ, PYTHONPATH=str(ROOT)))

    def _ask(self, cmd: str, arg) -> int:
        self.proc.stdin.write(json.dumps([cmd, arg]) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def run(self, argv: list[str], log: Path) -> int:
        return self._ask("run", [argv, str(log)])

    def wait(self, pid: int) -> int:
        return self._ask("wait", pid)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlpt.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def strip(rows: list[dict]) -> list[dict]:
    """Metrics without what depends on the machine's moment (wall clock, memory marks)."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in rows]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model(latest_checkpoint(run_dir)).state_dict()


def hold(zygote: Zygote, argv: list[str], log: Path, run_dir: Path) -> tuple[int, float]:
    """Start `rlpt <argv>` in a zygote child; return (pid, the moment it holds `run_dir`'s lock: its imports
    and config are behind it, what follows is the job)."""
    pid, lock, t0 = zygote.run(argv, log), run_dir / LOCK, time.perf_counter()
    while not (lock.exists() and lock.read_text().strip() == str(pid)):
        assert time.perf_counter() - t0 < 120, f"rlpt never took {lock}: {log.read_text()[-2000:]}"
        time.sleep(0.002)
    return pid, time.perf_counter()


def saved(run_dir: Path) -> tuple[int, int]:
    """(SFT start's latest step, RL's latest step): how far the killed run has come."""
    return tuple(int(p.read_text()[5:]) if p.exists() else -1
                 for p in (run_dir / "sft" / "checkpoints" / "latest", run_dir / "checkpoints" / "latest"))


def exited(pid: int) -> bool:
    """The zygote's child has ended (a zombie until the zygote reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_sigkill_at_20_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    out, killed = tmp_path / "runs", tmp_path / "runs" / "killed"
    args = ["train", *JOB, f"run.out_dir={out}"]
    zygote = Zygote(tmp_path)
    try:
        ref, t0 = hold(zygote, [*args, "run.name=straight"], tmp_path / "straight.log", out / "straight")
        assert zygote.wait(ref) == 0, (tmp_path / "straight.log").read_text()
        job_s = time.perf_counter() - t0                      # the uninterrupted job, lock to exit
        # Each try runs until it has saved one more checkpoint than the last try left, then dies within the
        # next ~4 steps (a step and its save take ~0.1 s here): kills land at random moments of the SFT start
        # and the RL steps, in and between saves, and every try moves on. A finished run dies at a random
        # moment of its final phase (the re-save of the last step, the final evaluation, the report).
        rng, kills, tries, log, where = random.Random(13), 0, 0, tmp_path / "killed.log", []
        while kills < KILLS:
            tries += 1
            assert tries <= 3 * KILLS, f"only {kills} kills landed in {tries} tries"
            before = saved(killed)
            pid, _ = hold(zygote, [*args, "run.name=killed", *(["--resume"] if tries > 1 else [])], log, killed)
            if before[1] < STEPS:
                while saved(killed) <= before and not exited(pid):
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.5))
            else:
                time.sleep(rng.uniform(0.0, job_s / 2))
            os.kill(pid, signal.SIGKILL)                      # a no-op on a child that already exited
            status = zygote.wait(pid)
            if os.WIFSIGNALED(status):
                kills += 1
                where.append(saved(killed))
            else:
                assert os.waitstatus_to_exitcode(status) == 0, log.read_text()[-3000:]
    finally:
        zygote.close()
    print("(SFT, RL) latest step after each kill:", where)
    assert "Traceback" not in log.read_text()
    done = cli(*args, "run.name=killed", "--resume")           # a fresh process finishes the job
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = out / "straight", out / "killed"
    for sub in (Path("sft"), Path(".")):                      # the SFT start, then the RL run
        wa, wb = final_weights(a / sub), final_weights(b / sub)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), sub
        assert strip(read_metrics(a / sub / "metrics.jsonl")) == strip(read_metrics(b / sub / "metrics.jsonl"))
    assert latest_checkpoint(b).name == f"step_{STEPS:08d}"
    assert not [p for p in b.rglob(".*") if p.name != LOCK], "leftovers of a save"
    assert (b / LOCK).read_text() == ""


@pytest.mark.slow
def test_two_runs_on_one_folder_cannot_both_proceed(tmp_path):
    out = tmp_path / "runs"
    args = ["train", *JOB, f"run.out_dir={out}", "run.name=c", "steps=400", "sft.steps=2"]
    zygote = Zygote(tmp_path)
    try:
        first, _ = hold(zygote, args, tmp_path / "first.log", out / "c")
        lock = out / "c" / LOCK
        second = cli(*args, "--resume")
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"rlpt train: error: run folder {str(out / 'c')!r} is in use by another rlpt process (PID {first}): "
            "wait for it to finish, stop it, or choose another run.name=<new name> (nothing was changed)"]
        os.kill(first, signal.SIGTERM)                        # a scheduler's stop: save at the step boundary
        assert os.waitstatus_to_exitcode(zygote.wait(first)) == 130
    finally:
        zygote.close()
    err = (tmp_path / "first.log").read_text()
    assert "SIGTERM: finishing this step, then saving a checkpoint" in err and "Traceback" not in err
    step = int(latest_checkpoint(out / "c").name.split("_")[1])
    assert f"rlpt train: interrupted at step {step}: saved" in err and 0 < step < 400
    assert lock.read_text() == ""
