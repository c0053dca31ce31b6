"""The code sandbox's machinery (rlpt/envs/jail.py, code_sandbox.py): the jail is built as stated, limits and
clean-up hold, the verdict is the host's, a missing bwrap is a ConfigError. The hostile programs are in
tests/test_hostile.py."""
from __future__ import annotations

import os
import re
import struct
import time

import pytest

from rlpt.config import ConfigError
from rlpt.envs import code_sandbox, jail
from rlpt.envs.code_sandbox import CodeEnv, CodeProblem, Limits, capabilities, run_program
from rlpt.framework.environment import Prompt

FAST = Limits(cpu_s=1, wall_s=3.0)
SUM = CodeProblem("sum", [("1 2\n", "3"), ("5 5\n", "10"), ("0 0\n", "0")])
GOOD_SUM = "a, b = map(int, input().split())\nprint(a + b)\n"


def leftovers() -> tuple[list[str], list[str]]:
    """Sandbox cgroups and host folders still present (each run removes its own)."""
    root = jail.cgroup_root()
    cgs = [n for b in (root.bases if root else ()) for n in os.listdir(b) if n.startswith(f"rlpt-sbx-{os.getpid()}-")]
    tmp = [n for n in os.listdir("/tmp") if n.startswith("rlpt_sbx_")]
    return cgs, tmp


def test_a_correct_program_passes_and_leaves_nothing():
    before = leftovers()
    r = run_program("print(sum(map(int, input().split())))", "1 2 3\n", FAST)
    assert (r.status, r.returncode, r.stdout, r.stderr) == ("ok", 0, "6\n", "")
    assert leftovers() == before


def test_the_jail_is_what_the_docs_say():
    """uid 1000 without capabilities, no_new_privs, seccomp on, pid 2 under bwrap's pid 1, a root of python only."""
    code = ("import os\n"
            "st = dict(l.split(':\\t') for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
            "print(os.getuid(), os.getpid(), st['CapEff'].strip(), st['NoNewPrivs'].strip(), st['Seccomp'].strip())\n"
            "print(sorted(os.listdir('/')), sorted(p for p in os.listdir('/proc') if p.isdigit()), os.getcwd())\n"
            "print(sorted(os.listdir('/usr')), sorted(os.listdir('/usr/lib')), sorted(os.listdir('/tmp')))\n")
    r = run_program(code, limits=FAST)
    assert r.status == "ok", r.reason
    ids, tree, usr = r.stdout.splitlines()
    assert ids == "1000 2 0000000000000000 1 2"
    assert tree == "['dev', 'lib', 'lib64', 'proc', 'sandbox', 'tmp', 'usr'] ['1', '2'] /tmp"
    assert re.fullmatch(r"\['bin', 'lib'\] \['python3\.\d+'\] \[\]", usr)


def test_exit_codes_are_the_programs_never_a_sandbox_error():
    """The verdict channel: bwrap's status fd. Every code 0..255 the program can exit with reads as its own."""
    codes = list(range(0, 256, 17)) + [97, 1, 137, 255]
    for code in codes:
        r = run_program(f"raise SystemExit({code})", limits=FAST)
        assert r.returncode == code and r.status == ("ok" if code == 0 else "killed" if code > 128 else "error"), r


def test_every_exit_code_classifies_as_the_programs_own():
    for rc in range(256):
        for err in ("", "MemoryError", "OSError: [Errno 27] File too large", "x" * 10**5):
            status, reason = code_sandbox._classify(rc, err, False, False, 1.0, FAST)
            assert status == ("ok" if rc == 0 else "killed" if rc > 128 else "error") and len(reason) < 300


def test_verdict_needs_exit_zero_and_the_exact_output():
    env = CodeEnv([SUM], limits=FAST)
    p = Prompt("sum", [], 0)
    assert env.verify(p, GOOD_SUM).reward == 1.0
    assert env.verify(p, GOOD_SUM + "raise SystemExit(3)\n").reward == 0.0          # right output, failing exit
    v = env.verify(p, "print(3)")
    assert (v.reward, v.info["tests_passed"], "sandbox_error" in v.info) == (1 / 3, 1, False)


def test_the_whole_verify_has_one_wall_clock():
    """Three tests each answered just under the per-test clock: the verify stops at verify_wall_s."""
    lim = Limits(cpu_s=1, wall_s=1.0, verify_wall_s=1.5)
    env = CodeEnv([SUM], limits=lim)
    slow = "import time\ntime.sleep(0.8)\n" + GOOD_SUM
    t0 = time.perf_counter()
    v = env.verify(Prompt("sum", [], 0), slow)
    took = time.perf_counter() - t0
    assert v.info["tests_passed"] == 1 and v.reward == pytest.approx(1 / 3)
    assert took < lim.verify_wall_s + 0.6, took


def test_program_too_long_is_not_run():
    r = run_program("#" * 300_000, limits=FAST)
    assert (r.status, r.returncode) == ("error", None) and "longer than" in r.reason


def test_seccomp_filter_is_the_stated_program():
    prog = jail.seccomp_filter()
    insns = [struct.unpack("<HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    assert len(insns) == 6 + 2 * len(jail.X86_64_DENY) + 7
    assert insns[:3] == [(0x20, 0, 0, 4), (0x15, 1, 0, jail.AUDIT_ARCH_X86_64), (0x06, 0, 0, jail.RET_KILL_PROCESS)]
    assert insns[-1] == (0x06, 0, 0, jail.RET_ALLOW)
    denied = {k for code, _, _, k in insns if code == 0x15} - {jail.AUDIT_ARCH_X86_64, 56, 435}
    assert denied == set(jail.X86_64_DENY.values())


@pytest.mark.skipif(not os.path.exists("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"), reason="no kernel headers")
def test_seccomp_syscall_numbers_match_the_kernel_headers():
    text = open("/usr/include/x86_64-linux-gnu/asm/unistd_64.h").read()
    nr = {m[0]: int(m[1]) for m in re.findall(r"#define __NR_(\w+) (\d+)", text)}
    assert {k: nr[k] for k in jail.X86_64_DENY} == jail.X86_64_DENY
    assert (nr["clone"], nr["clone3"]) == (jail.X86_64_CLONE, jail.X86_64_CLONE3)


def test_the_root_holds_the_system_python_and_nothing_of_the_project():
    interp = jail.interpreter()
    assert interp.path == "/usr/bin/python3"
    dests = [d for _, d in interp.binds]
    assert all(d.startswith(("/usr/bin/python3", "/usr/lib/python3.", "/lib/", "/usr/lib/x86_64", "/lib64/"))
               for d in dests)
    assert not any("rlpt" in s or ".venv" in s or s.startswith(("/root", "/work", "/home")) for s, _ in interp.binds)


@pytest.fixture
def fresh_capabilities():
    code_sandbox.capabilities.cache_clear()
    yield
    code_sandbox.capabilities.cache_clear()


def test_missing_bwrap_is_a_config_error_naming_the_fix(monkeypatch, fresh_capabilities):
    monkeypatch.setattr(jail.shutil, "which", lambda *a, **k: None)
    with pytest.raises(ConfigError, match="apt-get install bubblewrap"):
        CodeEnv([SUM])
    with pytest.raises(ConfigError, match="bubblewrap"):
        run_program("print(1)")


def test_a_bwrap_that_cannot_build_the_jail_is_a_config_error(monkeypatch, fresh_capabilities):
    monkeypatch.setattr(jail, "bwrap_argv", lambda *a, **k: ["/bin/false"])   # bwrap failing before the program
    with pytest.raises(ConfigError, match="cannot build the code sandbox"):
        capabilities()


def test_capabilities_say_which_memory_bound_holds():
    cap = capabilities()
    assert cap["bwrap"].endswith("bwrap") and cap["interpreter"] == "/usr/bin/python3"
    if cap["cgroup"] is None:
        assert "RLIMIT_AS" in cap["notes"][0]
    else:
        assert cap["cgroup"] in (1, 2) and cap["notes"] == []
