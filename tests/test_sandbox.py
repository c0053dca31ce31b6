"""Hostile programs in the code sandbox: each contained, scored 0 with a reason, the host and batch unharmed.

Cases that rely on the uid change (fork bomb, killing the parent, reading/writing host files) are
skipped where the host cannot change uid; the socket case is an expected failure without a network
namespace. `capabilities()` says which held here.
"""
from __future__ import annotations

import os
import socket
import time

import pytest

from rlpt.envs.code_sandbox import CodeEnv, CodeProblem, Limits, _uids_in_use, capabilities, run_program
from rlpt.framework.environment import Prompt

CAP = capabilities()
needs_uid = pytest.mark.skipif(not CAP["setuid"], reason="no uid change on this host: not provably safe here")
FAST = Limits(cpu_s=1, wall_s=3.0, nproc=8)


def live_sandbox_processes(uids_before) -> list[int]:
    """Pids of running (not zombie: killed, awaiting their reaper) processes of sandbox uids new since `before`."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            st = os.stat(f"/proc/{pid}")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if 60000 <= st.st_uid < 65000 and st.st_uid not in uids_before and state != "Z":
            out.append(int(pid))
    return out


def no_sandbox_processes_left(uids_before):
    time.sleep(0.1)
    return not live_sandbox_processes(uids_before)


def test_a_correct_program_passes():
    r = run_program("print(sum(map(int, input().split())))", "1 2 3\n", FAST)
    assert (r.status, r.stdout.strip()) == ("ok", "6")


def test_infinite_loop():
    t0 = time.perf_counter()
    r = run_program("while True:\n    pass\n", limits=FAST)
    assert r.status == "killed" and "cpu" in r.reason and time.perf_counter() - t0 < FAST.wall_s + 2


def test_sleep_forever_hits_wall_clock():
    r = run_program("import time\ntime.sleep(1000)\n", limits=Limits(wall_s=1.0))
    assert r.status == "timeout" and "wall" in r.reason


@needs_uid
def test_fork_bomb_is_bounded_and_fully_killed():
    before = _uids_in_use()
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.perf_counter()
    r = run_program(code, limits=Limits(cpu_s=1, wall_s=2.0, nproc=8))
    assert r.status in ("killed", "timeout") and time.perf_counter() - t0 < 6
    assert no_sandbox_processes_left(before)


@needs_uid
def test_daemonised_child_is_killed_after_the_run():
    before = _uids_in_use()
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(100)\nprint('parent done')\n"
    r = run_program(code, limits=FAST)
    assert r.status == "ok"
    assert no_sandbox_processes_left(before)


def test_memory_hog():
    r = run_program("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))\n", limits=Limits(mem_bytes=256 << 20))
    assert r.status == "error" and "memory" in r.reason


def test_printing_gigabytes():
    r = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 2**20)\n",
                    limits=Limits(fsize_bytes=1 << 20, output_bytes=4096))
    assert r.status in ("error", "killed") and "output limit" in r.reason and len(r.stdout) <= 4096


@needs_uid
def test_writing_outside_its_dir(tmp_path):
    target = tmp_path / "pwned.txt"
    r = run_program(f"open({str(target)!r}, 'w').write('x')\n", limits=FAST)
    assert r.status == "error" and "PermissionError" in r.reason and not target.exists()
    victim = tmp_path / "keep.txt"
    victim.write_text("keep")
    r = run_program(f"import os\nos.remove({str(victim)!r})\n", limits=FAST)
    assert r.status == "error" and victim.read_text() == "keep"


@needs_uid
def test_reading_files_outside_it(tmp_path):
    secret = tmp_path / "hidden_tests.txt"
    secret.write_text("SECRET-EXPECTED-OUTPUT")
    os.chmod(secret, 0o600)
    r = run_program(f"print(open({str(secret)!r}).read())\n", limits=FAST)
    assert r.status == "error" and "SECRET" not in r.stdout
    r = run_program("import os\nprint(os.listdir('/root'))\n", limits=FAST)
    assert r.status == "error"


def test_opening_a_socket():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'pwned')\n"
    r = run_program(code, limits=FAST)
    try:
        conn, _ = srv.accept()
        got = True
        conn.close()
    except TimeoutError:
        got = False
    srv.close()
    if not CAP["netns"]:
        pytest.xfail("no network namespace here: " + "; ".join(CAP["notes"]))
    assert r.status == "error" and not got


@needs_uid
def test_killing_its_parent():
    r = run_program("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", limits=FAST)
    assert r.status == "error" and "PermissionError" in r.reason      # and we are still here


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("RLPT_HOST_SECRET", "hunter2")
    r = run_program("import os\nprint(dict(os.environ))\n", limits=FAST)
    assert r.status == "ok" and "hunter2" not in r.stdout


def test_hostile_batch_scores_zero_and_the_rest_is_unharmed():
    env = CodeEnv([CodeProblem("sum", [("1 2\n", "3"), ("5 5\n", "10")])], limits=Limits(cpu_s=1, wall_s=2.0))
    p = Prompt("sum", [], 0)
    hostile = ["while True: pass", "import os\nos.kill(os.getppid(), 9)" if CAP["setuid"] else "raise SystemExit(3)",
               "print('x' * 10**9)", "x = bytearray(10**11)", "import sys\nsys.exit(1)", "print(3)"]
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    verdicts = [env.verify(p, c) for c in hostile + [good]]
    assert [v.reward for v in verdicts[:-2]] == [0.0] * (len(hostile) - 1)
    assert verdicts[-2].reward == 0.5                                    # passes one test of two
    assert all("sandbox_reason" in v.info for v in verdicts[:-1])
    assert verdicts[-1].reward == 1.0 and verdicts[-1].info["correct"]
