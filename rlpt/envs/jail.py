"""The jail the code env runs untrusted programs in: bubblewrap namespaces, a seccomp filter, a cgroup.

    program ⊂ bwrap(fresh mount/pid/net/ipc/uts/user/cgroup namespaces; read-only root = python3 + stdlib + its
              shared libraries; sized tmpfs /tmp; no capabilities; no_new_privs; seccomp deny-list)
            ⊂ cgroup(memory.max, pids.max) ⊂ a dedicated unused host uid (RLIMIT_NPROC, `kill -1`)

Why these pieces (lesson 18): a verifier that runs model-written code is an attack surface, and a
reward read from any file the program can open is a reward it can steal. bubblewrap (Debian's
`bubblewrap`, what Flatpak uses) builds the namespaces, so the isolation is a well-kept tool's, not
ours; this module only chooses what goes in. The interpreter is the system `/usr/bin/python3`, never
the project's venv python: its standard library lives in a root-owned system path that holds nothing
of rlpt's, and `-I -S` keeps every site-packages out. The filter (a classic BPF program, built here
because CPython has no libseccomp binding) refuses the syscalls a sandboxed program has no use for
and that attack the kernel or escape namespaces: mount, unshare, setns, ptrace, bpf, io_uring,
keyctl, new namespaces through clone, ...; clone3 answers ENOSYS so libc falls back to clone, whose
flags the filter can see. The cgroup bounds the whole process tree, not each process; where no
cgroup is writable the bound is RLIMIT_AS per process × RLIMIT_NPROC for the uid, and `capabilities()`
in code_sandbox.py says which holds.
"""
from __future__ import annotations

import functools
import glob
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass

from rlpt.config import ConfigError

SYSTEM_PYTHON = "/usr/bin/python3"
SANDBOX_UID = 1000                   # the program's uid inside its user namespace (unprivileged, no caps)

INSTALL_BWRAP = "install it with `apt-get install bubblewrap` (`make install` does)"


def bwrap() -> str:
    """The bubblewrap binary; a clear error, never a fallback to running unjailed."""
    path = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")
    if path is None:
        raise ConfigError(f"the code sandbox needs bubblewrap (bwrap), which is missing: {INSTALL_BWRAP}")
    return path


@dataclass(frozen=True)
class Interpreter:
    path: str                        # what the sandbox executes, e.g. /usr/bin/python3
    binds: tuple[tuple[str, str], ...]  # (host source, sandbox path): binary, stdlib, shared libraries


@functools.lru_cache(maxsize=1)
def interpreter() -> Interpreter:
    """The system python, its standard library, and the shared libraries it and its C modules load."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        raise ConfigError(f"the code sandbox runs programs with {SYSTEM_PYTHON}, which is missing: "
                          "install it with `apt-get install python3-minimal`")
    q = subprocess.run([SYSTEM_PYTHON, "-I", "-S", "-c", "import sysconfig as s; print(s.get_paths()['stdlib'])"],
                       capture_output=True, text=True, check=True)
    stdlib = q.stdout.strip()
    binds = {SYSTEM_PYTHON: os.path.realpath(SYSTEM_PYTHON), stdlib: os.path.realpath(stdlib)}
    elves = [SYSTEM_PYTHON, *glob.glob(os.path.join(stdlib, "lib-dynload", "*.so"))]
    ldd = subprocess.run(["ldd", *elves], capture_output=True, text=True).stdout
    for lib in re.findall(r"(/\S+) \(0x", ldd):           # "libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x...)"
        binds.setdefault(lib, os.path.realpath(lib))
    return Interpreter(SYSTEM_PYTHON, tuple((src, dest) for dest, src in sorted(binds.items())))


# --- seccomp: a deny-list in classic BPF (struct sock_filter {u16 code; u8 jt, jf; u32 k}) ---------------------------
AUDIT_ARCH_X86_64 = 0xC000003E
X32_BIT = 0x40000000
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
EPERM, ENOSYS = 1, 38
CLONE_NEW_ANY = 0x7E020000           # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
LD_W_ABS, JEQ_K, JSET_K, RET_K = 0x20, 0x15, 0x45, 0x06
X86_64_DENY = {                      # from <asm/unistd_64.h>; refused with EPERM
    "ptrace": 101, "syslog": 103, "uselib": 134, "personality": 135, "vhangup": 153, "adjtimex": 159,
    "pivot_root": 155, "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166,
    "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172,
    "ioperm": 173, "create_module": 174, "init_module": 175, "delete_module": 176, "quotactl": 179,
    "nfsservctl": 180, "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "unshare": 272, "perf_event_open": 298, "fanotify_init": 300,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313, "kexec_file_load": 320,
    "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "pidfd_getfd": 438, "mount_setattr": 442, "quotactl_fd": 443,
}
X86_64_CLONE, X86_64_CLONE3 = 56, 435


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


@functools.lru_cache(maxsize=1)
def seccomp_filter() -> bytes:
    """The BPF program bwrap loads with --seccomp: wrong arch -> kill, x32 -> EPERM, denied -> EPERM, else allow."""
    if platform.machine() != "x86_64":
        raise ConfigError(f"the code sandbox's seccomp filter knows x86_64 syscall numbers only, not "
                          f"{platform.machine()}: run code verification on an x86_64 host")
    deny = sorted(X86_64_DENY.values())
    prog = [_insn(LD_W_ABS, 4),                                   # A = seccomp_data.arch
            _insn(JEQ_K, AUDIT_ARCH_X86_64, 1, 0), _insn(RET_K, RET_KILL_PROCESS),
            _insn(LD_W_ABS, 0),                                   # A = seccomp_data.nr
            _insn(0x35, X32_BIT, 0, 1), _insn(RET_K, RET_ERRNO | EPERM)]   # JGE: the x32 ABI
    prog += [_insn(JEQ_K, nr, 0, 1) + _insn(RET_K, RET_ERRNO | EPERM) for nr in deny]
    prog += [_insn(JEQ_K, X86_64_CLONE3, 0, 1), _insn(RET_K, RET_ERRNO | ENOSYS),
             _insn(JEQ_K, X86_64_CLONE, 0, 3), _insn(LD_W_ABS, 16),  # A = low word of clone's flags
             _insn(JSET_K, CLONE_NEW_ANY, 0, 1), _insn(RET_K, RET_ERRNO | EPERM),
             _insn(RET_K, RET_ALLOW)]
    return b"".join(prog)


def bwrap_argv(interp: Interpreter, scratch_bytes: int, code_fd: int, seccomp_fd: int, status_fd: int) -> list[str]:
    """The jail, in bwrap's words; mounts are made in order, so the root goes read-only last."""
    argv = [bwrap(), "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(SANDBOX_UID),
            "--gid", str(SANDBOX_UID), "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    for k, v in (("PATH", "/usr/bin"), ("HOME", "/tmp"), ("TMPDIR", "/tmp"), ("LANG", "C.UTF-8"),
                 ("PYTHONHASHSEED", "0")):
        argv += ["--setenv", k, v]
    for src, dest in interp.binds:
        argv += ["--ro-bind", src, dest]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(scratch_bytes), "--tmpfs", "/tmp",
             "--ro-bind-data", str(code_fd), "/sandbox/main.py", "--remount-ro", "/dev", "--remount-ro", "/",
             "--chdir", "/tmp", "--seccomp", str(seccomp_fd), "--json-status-fd", str(status_fd),
             "--", interp.path, "-I", "-S", "/sandbox/main.py"]
    return argv


# --- the cgroup: one per run, holding bwrap and everything below it ---------------------------------------------------
@dataclass(frozen=True)
class CgroupRoot:
    version: int                     # 2 (unified) or 1 (a memory and a pids hierarchy)
    bases: tuple[str, ...]           # where run cgroups are made: v2 one folder, v1 (memory, pids)


def _own_cgroups() -> tuple[dict[str, str], list[tuple[str, str, str, str]]]:
    """(controller or '' -> our cgroup path, [(fstype, mount root, mount point, super options)])."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                own[c] = path
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, post = line.split(" - ", 1)
            fields, (fstype, _, opts) = pre.split(), post.split()[:3]
            if fstype in ("cgroup", "cgroup2"):
                mounts.append((fstype, fields[3], fields[4], opts))
    return own, mounts


def _writable_dir(base: str) -> bool:
    probe = os.path.join(base, f"rlpt-probe-{os.getpid()}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def cgroup_root() -> CgroupRoot | None:
    """A cgroup we may make children in with memory and pids limits: v2 if usable, else v1, else None."""
    try:
        own, mounts = _own_cgroups()
    except OSError:
        return None
    for fstype, root, point, _ in mounts:
        if fstype == "cgroup2" and "" in own:
            base = point + own[""][len(root.rstrip("/")):]
            try:
                with open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory +pids")
            except OSError:
                continue         # controllers bound to v1, or our cgroup holds processes: "no internal processes"
            if _writable_dir(base):
                return CgroupRoot(2, (base,))
    bases = []
    for ctrl in ("memory", "pids"):
        for fstype, root, point, opts in mounts:
            if fstype == "cgroup" and ctrl in opts.split(",") and ctrl in own:
                bases.append(point + own[ctrl][len(root.rstrip("/")):])
                break
    if len(bases) == 2 and all(map(_writable_dir, bases)):
        return CgroupRoot(1, tuple(bases))
    return None


class Cgroup:
    """One run's cgroup: made before the run, bwrap moved in before exec, emptied and removed after."""

    def __init__(self, root: CgroupRoot, name: str, mem_bytes: int, pids: int):
        self.root = root
        self.dirs = [os.path.join(b, name) for b in root.bases]
        for d in self.dirs:
            os.mkdir(d)
        if root.version == 2:
            limits = {"memory.max": mem_bytes, "memory.swap.max": 0, "pids.max": pids}
            paths = {k: os.path.join(self.dirs[0], k) for k in limits}
        else:
            limits = {"memory.limit_in_bytes": mem_bytes, "memory.memsw.limit_in_bytes": mem_bytes, "pids.max": pids}
            paths = {k: os.path.join(self.dirs[k.startswith("pids")], k) for k in limits}
        for k, v in limits.items():
            if k in ("memory.swap.max", "memory.memsw.limit_in_bytes") and not os.path.exists(paths[k]):
                continue                            # absent without swap accounting: no swap to bound
            with open(paths[k], "w") as f:
                f.write(str(v))
        self.procs = [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def _read(self, i: int, name: str) -> str:
        try:
            with open(os.path.join(self.dirs[i], name)) as f:
                return f.read()
        except OSError:
            return ""

    def pids(self) -> set[int]:
        return {int(p) for i in range(len(self.dirs)) for p in self._read(i, "cgroup.procs").split()}

    def oom_killed(self) -> bool:
        text = self._read(0, "memory.events" if self.root.version == 2 else "memory.oom_control")
        m = re.search(r"^oom_kill (\d+)", text, re.M)
        return bool(m and int(m.group(1)))

    def peak_bytes(self) -> int | None:
        text = self._read(0, "memory.peak" if self.root.version == 2 else "memory.max_usage_in_bytes").strip()
        return int(text) if text.isdigit() else None

    def kill(self, timeout_s: float = 5.0) -> None:
        """SIGKILL all it holds until it is empty (a fork between our read and our kill is caught next round)."""
        t_end = time.monotonic() + timeout_s
        while pids := self.pids():
            if time.monotonic() > t_end:
                raise RuntimeError(f"sandbox cgroup {self.dirs} still holds {sorted(pids)} after {timeout_s:g}s")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.002)

    def remove(self, timeout_s: float = 5.0) -> None:
        """rmdir, retried: it fails with EBUSY while a killed task is still being torn down."""
        t_end = time.monotonic() + timeout_s
        for d in self.dirs:
            while os.path.isdir(d):
                try:
                    os.rmdir(d)
                except OSError:
                    if time.monotonic() > t_end:
                        raise
                    self.kill(timeout_s)
                    time.sleep(0.002)
