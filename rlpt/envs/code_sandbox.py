"""Code env: run an untrusted Python program against hidden tests in a jail; reward = fraction passed.

    reward = (1/N) Σ_i [ exit_code_i == 0  and  stdout(program, stdin_i).strip() == expected_i.strip() ]

Each test is one fresh jail (rlpt/envs/jail.py: bubblewrap namespaces, a read-only root holding only
the system python and its standard library, a sized tmpfs as /tmp and cwd, no network, no
capabilities, no_new_privs, a seccomp filter), started as a dedicated unused host uid inside a
cgroup of its own. The hidden tests never enter the jail: the host writes stdin_i to a file the
program gets as fd 0, reads back at most `output_bytes` of its stdout file, and compares. The exit
code comes from bwrap's status fd, which the program cannot reach; a run is a sandbox failure only
if bwrap never started the program, so no exit code, output or signal of the program can read as one.

Limits (`Limits`), each for the whole process tree where a cgroup is writable (`capabilities()`):
memory (cgroup memory limit; RLIMIT_AS per process on top), processes (cgroup pids.max and
RLIMIT_NPROC for the uid), scratch disk (tmpfs size; RLIMIT_FSIZE per file, stdout included), CPU
per process (RLIMIT_CPU), wall clock per test and for the whole verify (`verify_wall_s`: a program
answering just under the per-test clock does not multiply it by N). Without a cgroup the memory
bound is RLIMIT_AS × RLIMIT_NPROC. When a run ends, its cgroup (or, without one, its uid) is
emptied with SIGKILL and the jail's pid namespace and tmpfs die with it: no process, no file survives.

What this is not: a VM. A kernel exploit through an allowed syscall, side channels, and CPU time
used within the limits are not defended (docs/reliability.md, "The code sandbox"). A response in a
fenced ```python block is unwrapped first.
"""
from __future__ import annotations

import functools
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

from rlpt.config import ConfigError
from rlpt.envs import jail
from rlpt.framework.environment import Environment, Prompt, Verdict, register_env


@dataclass
class Limits:
    cpu_s: int = 2                 # RLIMIT_CPU per process (SIGXCPU, then SIGKILL at +1 s)
    wall_s: float = 5.0            # wall clock for one test
    verify_wall_s: float = 8.0     # wall clock for one verify, all tests together
    mem_bytes: int = 512 << 20     # the whole tree (cgroup); also RLIMIT_AS per process
    fsize_bytes: int = 1 << 20     # RLIMIT_FSIZE: any one file written, stdout included
    scratch_bytes: int = 16 << 20  # size of the tmpfs at /tmp, the only writable place
    nproc: int = 16                # processes and threads of the program (cgroup pids.max, RLIMIT_NPROC)
    nofile: int = 64
    output_bytes: int = 64 << 10   # how much stdout/stderr the host reads back
    code_bytes: int = 256 << 10    # a longer program is not run


@dataclass
class RunResult:
    status: str                    # "ok" | "error" | "timeout" | "killed" | "sandbox_error"
    returncode: int | None         # the program's exit code (128 + n: killed by signal n)
    stdout: str
    stderr: str
    reason: str
    wall_s: float
    notes: list[str] = field(default_factory=list)
    peak_mem_bytes: int | None = None  # the cgroup's high-water mark, where there is one


JAIL_OVERHEAD = 2                  # bwrap outside + bwrap as pid 1 inside: tasks in the cgroup besides the program


@functools.lru_cache(maxsize=1)
def capabilities() -> dict:
    """What holds on this host; ConfigError where the jail cannot be built (bwrap missing or refused)."""
    jail.bwrap()
    interp = jail.interpreter()
    jail.seccomp_filter()
    root = jail.cgroup_root()
    notes = [] if root else ["no writable cgroup: memory is bounded per process (RLIMIT_AS) times RLIMIT_NPROC, "
                             "not for the whole tree"]
    cap = {"bwrap": jail.bwrap(), "interpreter": interp.path, "cgroup": root.version if root else None,
           "root": os.geteuid() == 0, "notes": notes}
    if not cap["root"]:
        raise ConfigError("the code sandbox must start as root (it runs each program as a fresh unused uid): "
                          "run rlpt as root, e.g. in a container")
    probe = run_program("print(6 * 7)", limits=Limits(wall_s=20.0), _cap=cap)
    if (probe.status, probe.stdout.strip()) != ("ok", "42"):
        raise ConfigError(f"bubblewrap cannot build the code sandbox here ({probe.reason or probe.stderr[:300]}); "
                          "it needs user namespaces (sysctl user.max_user_namespaces > 0)")
    return cap


def interpreter() -> str:
    """The python the jail runs programs with: the system one, see jail.py for why."""
    return jail.interpreter().path


_uid_lock = threading.Lock()
_uids_taken: set[int] = set()


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


def _take_uid() -> int:
    """An unused uid of our own for one run, so RLIMIT_NPROC and `kill -1` touch nothing else."""
    with _uid_lock:
        used = _uids_in_use() | _uids_taken
        start = random.randrange(5000)
        for i in range(5000):
            uid = 60000 + (start + i) % 5000
            if uid not in used:
                _uids_taken.add(uid)
                return uid
    raise RuntimeError("no free sandbox uid in 60000..64999")


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid`: kill(-1) as that uid reaches exactly its own processes."""
    if shutil.which("setpriv") and shutil.which("kill"):
        subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "kill", "-9", "-1"],
                       capture_output=True)


def _child_setup(lim: Limits, uid: int, procs: list[str]):
    def setup():   # runs in the child between fork and exec of bwrap: syscalls only
        for path in procs:            # into the run's cgroup before anything of the program exists
            fd = os.open(path, os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
        for res, v in ((resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s + 1)), (resource.RLIMIT_AS, (lim.mem_bytes,) * 2),
                       (resource.RLIMIT_FSIZE, (lim.fsize_bytes,) * 2),
                       (resource.RLIMIT_NPROC, (lim.nproc + JAIL_OVERHEAD,) * 2),
                       (resource.RLIMIT_NOFILE, (lim.nofile,) * 2), (resource.RLIMIT_CORE, (0, 0))):
            resource.setrlimit(res, v)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        os.umask(0o077)
    return setup


def _read(path: str, n: int) -> str:
    with open(path, "rb") as f:
        return f.read(n).decode("utf-8", "replace")


def _status(path: str) -> dict:
    """bwrap's JSON status lines, merged: {"child-pid": …} once the program started, {"exit-code": …} when it ended."""
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                out.update(json.loads(line))
    return out


def run_program(code: str, stdin: str = "", limits: Limits | None = None, deadline: float | None = None,
                _cap: dict | None = None) -> RunResult:
    """Run `code` with `python -I -S` in a fresh jail; never raises for anything the program does.
    `deadline` (a time.perf_counter() value) cuts the wall clock short: a verify's clock for all its tests."""
    lim = limits or Limits()
    cap = _cap or capabilities()
    t0 = time.perf_counter()
    wall = lim.wall_s if deadline is None else min(lim.wall_s, deadline - t0)
    if wall <= 0:
        return RunResult("timeout", None, "", "", "verify wall clock spent", 0.0, list(cap["notes"]))
    if len(code.encode("utf-8", "replace")) > lim.code_bytes:
        return RunResult("error", None, "", "", f"program longer than {lim.code_bytes} bytes: not run", 0.0,
                         list(cap["notes"]))
    uid = _take_uid()
    host = tempfile.mkdtemp(prefix="rlpt_sbx_")   # root-only: the program gets fds, never this folder
    cg, timed_out, proc = None, False, None
    try:
        files = {"main.py": code, "stdin": stdin}
        for name, text in files.items():
            with open(os.path.join(host, name), "w", encoding="utf-8", errors="replace") as f:
                f.write(text)
        with open(os.path.join(host, "seccomp.bpf"), "wb") as f:
            f.write(jail.seccomp_filter())
        root = jail.cgroup_root() if cap["cgroup"] else None
        if root:
            cg = jail.Cgroup(root, f"rlpt-sbx-{os.getpid()}-{uid}", lim.mem_bytes, lim.nproc + JAIL_OVERHEAD)
        p = functools.partial(os.path.join, host)
        with open(p("stdin"), "rb") as fin, open(p("out"), "wb") as fout, open(p("err"), "wb") as ferr, \
                open(p("main.py"), "rb") as fcode, open(p("seccomp.bpf"), "rb") as fsec, open(p("status"), "wb") as fst:
            argv = jail.bwrap_argv(jail.interpreter(), lim.scratch_bytes, fcode.fileno(), fsec.fileno(), fst.fileno())
            proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, env={}, close_fds=True,
                                    pass_fds=(fcode.fileno(), fsec.fileno(), fst.fileno()), start_new_session=True,
                                    preexec_fn=_child_setup(lim, uid, cg.procs if cg else []))
            timed_out = not _wait(proc, wall)
        _end(proc, cg, uid)
        status = _status(p("status"))
        out, err = _read(p("out"), lim.output_bytes), _read(p("err"), lim.output_bytes)
        if "child-pid" not in status:              # bwrap failed before the program existed
            return RunResult("sandbox_error", None, "", "", f"bwrap: {err.strip()[:300]}", time.perf_counter() - t0,
                             list(cap["notes"]))
        rc = status.get("exit-code")
        oom, peak = (cg.oom_killed(), cg.peak_bytes()) if cg else (False, None)
        state, reason = _classify(rc, err, timed_out, oom, wall, lim)
        return RunResult(state, rc, out, err, reason, time.perf_counter() - t0, list(cap["notes"]), peak)
    except Exception as e:   # noqa: BLE001 - the host side failed; score 0, say why
        return RunResult("sandbox_error", None, "", "", f"{type(e).__name__}: {e}", time.perf_counter() - t0,
                         list(cap["notes"]))
    finally:
        if proc is not None and proc.returncode is None:
            _end(proc, cg, uid)
        if cg is not None:
            cg.remove()
        shutil.rmtree(host, ignore_errors=True)
        with _uid_lock:
            _uids_taken.discard(uid)


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for bwrap to exit, waking the moment it does (a pidfd; Popen.wait(timeout) polls every 50 ms)."""
    fd = os.pidfd_open(proc.pid)
    try:
        ready = select.select([fd], [], [], timeout)[0]
    finally:
        os.close(fd)
    if ready:
        proc.wait()
    return bool(ready)


def _end(proc: subprocess.Popen, cg: jail.Cgroup | None, uid: int) -> None:
    """Kill whatever is left: bwrap (its pid 1 inside dies with it, and the kernel kills the rest of the
    pid namespace), then every task in the cgroup, or without one every process of the uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    if cg is not None:
        cg.kill()
    else:
        _kill_uid(uid)


def _classify(rc: int | None, err: str, timed_out: bool, oom: bool, wall: float, lim: Limits) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"wall clock > {wall:g}s"
    if oom:
        return "killed", f"memory limit {lim.mem_bytes >> 20} MiB (whole process tree)"
    if rc == 0:
        return "ok", ""
    if rc is None:
        return "killed", "killed before it reported an exit code"
    if rc > 128:                       # bwrap reports death by signal n as 128 + n (so does exit(128 + n))
        n = rc - 128
        why = {signal.SIGXCPU: f"cpu limit {lim.cpu_s}s", signal.SIGKILL: "killed (cpu hard limit or memory)",
               signal.SIGXFSZ: f"output limit {lim.fsize_bytes} bytes"}
        return "killed", why.get(n, f"signal {n}")
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if "File too large" in last or "No space left" in last:   # EFBIG / ENOSPC: CPython ignores SIGXFSZ
        return "error", f"output limit {lim.fsize_bytes} bytes / scratch {lim.scratch_bytes >> 20} MiB: {last[:200]}"
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
        capabilities()       # a missing or refused bwrap is a ConfigError here, not a silent 0 on every sample
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
        code, passed, reasons, infra = extract_code(response), 0, [], []
        deadline = time.perf_counter() + self.limits.verify_wall_s     # one clock for all the tests
        for stdin, expected in tests:
            r = run_program(code, stdin, self.limits, deadline=deadline)
            ok = r.status == "ok" and r.stdout.strip() == expected.strip()
            passed += ok
            if not ok:
                reasons.append(r.reason or "wrong output")
            if r.status == "sandbox_error":
                infra.append(r.reason)
            if r.status in ("timeout", "killed"):
                break        # a program that hangs once is not worth N more wall clocks
        info = {"correct": passed == len(tests), "tests_passed": passed, "tests_total": len(tests)}
        if reasons:
            info["sandbox_reason"] = reasons[0]
        if infra:            # the host failed, never the program: bwrap did not start it
            info["sandbox_error"] = infra[0]
        return Verdict(passed / len(tests), info)

    def heldout(self, n: int) -> list[Prompt]:
        return [self._prompt(i % len(self.problems)) for i in range(n)]

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
