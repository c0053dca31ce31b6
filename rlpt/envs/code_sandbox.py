"""Code env: run an untrusted Python program against hidden tests in a sandbox; reward = fraction passed.

    reward = (1/N) Σ_i [ stdout(program, stdin_i).strip() == expected_i.strip() ]

Each test is a fresh process (`python -I`, scrubbed environment, a new temp dir as cwd, stdin from a
file, stdout/stderr to size-limited files) started by `run_program` with, set in the child before
exec: a new session (so the whole group can be killed), a new network namespace (no interface but
a downed loopback: no network at all), resource limits (RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE,
RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_CORE = 0), and, when the host runs as root, a dedicated unused
uid: the kernel ignores RLIMIT_NPROC for root, and the uid is what keeps the program out of files
it did not create and from signalling anything but itself. After the program ends or hits the wall
clock, every process of that uid is killed with one `kill -9 -1` run as that uid (escaped
daemons and fork-bomb children included). Output beyond RLIMIT_FSIZE fails the write (EFBIG; CPython
ignores SIGXFSZ) or kills the program, so "print gigabytes" costs the host nothing.

What this is not: a VM. Seccomp, gVisor or Firecracker (lesson 18) also stop kernel
exploits; the world-writable /tmp stays writable (a mount namespace would fix that). Where the
host cannot make a network namespace or change uid, `capabilities()` says so, each result carries
the note, and those guarantees do not hold.

Hidden tests never touch the sandbox's disk: the host compares outputs. A response in a fenced
```python block is unwrapped first.
"""
from __future__ import annotations

import ctypes
import functools
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from rlpt.framework.environment import Environment, Prompt, Verdict, register_env

CLONE_NEWNET = 0x40000000


@dataclass
class Limits:
    cpu_s: int = 2                 # RLIMIT_CPU per process (SIGXCPU, then SIGKILL at +1 s)
    wall_s: float = 5.0            # wall clock for the whole process group
    mem_bytes: int = 512 << 20     # RLIMIT_AS
    fsize_bytes: int = 1 << 20     # RLIMIT_FSIZE: any file written, stdout included
    nproc: int = 16                # RLIMIT_NPROC for the sandbox uid
    nofile: int = 64
    output_bytes: int = 64 << 10   # how much stdout/stderr the host reads back


@dataclass
class RunResult:
    status: str                    # "ok" | "error" | "timeout" | "killed" | "sandbox_error"
    returncode: int | None
    stdout: str
    stderr: str
    reason: str
    wall_s: float
    notes: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def capabilities() -> dict:
    """What this host allows: a network namespace, a uid change. Probed once, in throwaway children."""
    netns = subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0 \
        if shutil.which("unshare") else False
    setuid = os.geteuid() == 0
    notes = []
    if not netns:
        notes.append("no network namespace on this host: the program can reach the network")
    if not setuid:
        notes.append("not root: no uid change, so RLIMIT_NPROC counts the host user's processes and file "
                     "permissions do not separate the program from the host")
    return {"netns": netns, "setuid": setuid, "kill_helper": bool(shutil.which("setpriv") and shutil.which("kill")),
            "notes": notes}


def interpreter() -> str:
    """A system python the sandbox uid may execute (a venv under /root is not reachable by it)."""
    return shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable


def _uids_in_use() -> set[int]:
    used = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as f:
                    used |= {int(x) for line in f if line.startswith("Uid:") for x in line.split()[1:]}
            except OSError:
                pass
    return used


def _free_uid() -> int:
    """An unused uid of our own for one run, so RLIMIT_NPROC and `kill -1` touch nothing else."""
    used = _uids_in_use()
    start = random.randrange(5000)
    for i in range(5000):
        uid = 60000 + (start + i) % 5000
        if uid not in used:
            return uid
    raise RuntimeError("no free sandbox uid in 60000..64999")


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid`: kill(-1) as that uid reaches exactly its own processes."""
    if capabilities()["kill_helper"]:
        subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "kill", "-9", "-1"],
                       capture_output=True)


def _child_setup(lim: Limits, uid: int | None, netns: bool):
    def setup():   # runs in the child between fork and exec: syscalls only
        if netns and ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
            os._exit(97)
        for res, v in ((resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s + 1)), (resource.RLIMIT_AS, (lim.mem_bytes,) * 2),
                       (resource.RLIMIT_FSIZE, (lim.fsize_bytes,) * 2), (resource.RLIMIT_NPROC, (lim.nproc,) * 2),
                       (resource.RLIMIT_NOFILE, (lim.nofile,) * 2), (resource.RLIMIT_CORE, (0, 0))):
            resource.setrlimit(res, v)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        os.umask(0o077)
    return setup


def _read(path: str, n: int) -> str:
    with open(path, "rb") as f:
        return f.read(n).decode("utf-8", "replace")


def run_program(code: str, stdin: str = "", limits: Limits | None = None) -> RunResult:
    """Run `code` with `python -I` in the sandbox; never raises for anything the program does."""
    lim = limits or Limits()
    cap = capabilities()
    uid = _free_uid() if cap["setuid"] else None
    work = tempfile.mkdtemp(prefix="rlpt_sbx_")      # the program's cwd, owned by its uid
    host = tempfile.mkdtemp(prefix="rlpt_sbx_io_")   # stdin/stdout files: root-only, the program gets fds
    t0 = time.perf_counter()
    try:
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(code)
        with open(os.path.join(host, "stdin"), "w") as f:
            f.write(stdin)
        if uid is not None:
            for p in (work, os.path.join(work, "main.py")):
                os.chown(p, uid, uid)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        with open(os.path.join(host, "stdin"), "rb") as fin, open(os.path.join(host, "out"), "wb") as fout, \
                open(os.path.join(host, "err"), "wb") as ferr:
            proc = subprocess.Popen([interpreter(), "-I", "-S", "main.py"], cwd=work, env=env, stdin=fin,
                                    stdout=fout, stderr=ferr, start_new_session=True, close_fds=True,
                                    preexec_fn=_child_setup(lim, uid, cap["netns"]))
            timed_out = False
            try:
                proc.wait(timeout=lim.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if uid is not None:
            _kill_uid(uid)          # whatever it forked, daemonised or not
        out = _read(os.path.join(host, "out"), lim.output_bytes)
        err = _read(os.path.join(host, "err"), lim.output_bytes)
        status, reason = _classify(proc.returncode, err, timed_out, lim)
        return RunResult(status, proc.returncode, out, err, reason, time.perf_counter() - t0, list(cap["notes"]))
    except Exception as e:   # noqa: BLE001 - the host side failed; score 0, say why
        return RunResult("sandbox_error", None, "", "", f"{type(e).__name__}: {e}", time.perf_counter() - t0,
                         list(cap["notes"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(host, ignore_errors=True)


def _classify(rc: int, err: str, timed_out: bool, lim: Limits) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"wall clock > {lim.wall_s:g}s"
    if rc == 0:
        return "ok", ""
    if rc == 97:
        return "sandbox_error", "could not enter a network namespace"
    if rc < 0:
        sig = signal.Signals(-rc)
        why = {signal.SIGXCPU: f"cpu limit {lim.cpu_s}s", signal.SIGKILL: "killed (cpu limit or wall clock)",
               signal.SIGXFSZ: f"output limit {lim.fsize_bytes} bytes"}.get(sig, sig.name)
        return "killed", why
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if "File too large" in last:      # EFBIG: CPython ignores SIGXFSZ, so the write fails instead
        return "error", f"output limit {lim.fsize_bytes} bytes: {last[:200]}"
    if "MemoryError" in last:
        return "error", f"memory limit {lim.mem_bytes >> 20} MiB: {last}"
    return "error", f"exit code {rc}: {last[:200]}"


def extract_code(response: str) -> str:
    m = re.search(r"```(?:python|py)?\n(.*?)```", response, re.S)
    return m.group(1) if m else response


@dataclass
class CodeProblem:
    prompt: str
    tests: list[tuple[str, str]]       # hidden (stdin, expected stdout)


# a few stdin -> stdout problems for tests and demos (hidden tests are never shown to the policy)
PROBLEMS = [
    CodeProblem("read two integers, print their sum", [("1 2\n", "3"), ("10 -4\n", "6"), ("0 0\n", "0")]),
    CodeProblem("read n, print n squared", [("3\n", "9"), ("12\n", "144"), ("0\n", "0")]),
    CodeProblem("read a line, print it reversed", [("abc\n", "cba"), ("racecar\n", "racecar"), ("ab\n", "ba")]),
]


@register_env("code")
class CodeEnv(Environment):
    """Programs scored by hidden tests in the sandbox. Prompt ids are the tokenizer's when it can encode
    the prompt (gpt_mini's char alphabet cannot encode most programs: this env is for HF policies)."""

    def __init__(self, problems: list[CodeProblem] | None = None, seed: int = 0, tokenizer=None,
                 limits: Limits | None = None, **_):
        self.problems = problems or PROBLEMS
        self.tokenizer = tokenizer
        self.limits = limits or Limits()
        self.rng = random.Random(seed)

    def _prompt(self, i: int) -> Prompt:
        p = self.problems[i]
        try:
            ids = self.tokenizer.encode(p.prompt) if self.tokenizer is not None else []
        except ValueError:
            ids = []
        return Prompt(p.prompt, ids, i)

    def reset(self, split: str = "train") -> Prompt:
        return self._prompt(self.rng.randrange(len(self.problems)))

    def verify(self, prompt: Prompt, response: str) -> Verdict:
        tests = self.problems[prompt.gold].tests
        code, passed, reasons = extract_code(response), 0, []
        for stdin, expected in tests:
            r = run_program(code, stdin, self.limits)
            ok = r.status == "ok" and r.stdout.strip() == expected.strip()
            passed += ok
            if not ok:
                reasons.append(r.reason or "wrong output")
            if r.status in ("timeout", "killed"):
                break        # a program that hangs once is not worth N more wall clocks
        info = {"correct": passed == len(tests), "tests_passed": passed, "tests_total": len(tests)}
        if reasons:
            info["sandbox_reason"] = reasons[0]
        return Verdict(passed / len(tests), info)

    def heldout(self, n: int) -> list[Prompt]:
        return [self._prompt(i % len(self.problems)) for i in range(n)]

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
