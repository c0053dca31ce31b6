"""Hostile programs against the code verifier (issue 13 §2): every cheat scores 0, every resource attack stays
inside the stated limits and leaves nothing behind, honest programs still pass. Plus hostile math answers.

Each stealing program is also run unjailed (plain `python3`, same input) and must score 1 there: the
attack is real, so its 0 in the jail is the jail's doing. The programs run in parallel threads once
per module (`results`); each test reads its own result.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlpt.envs import jail
from rlpt.envs.code_sandbox import PROBLEMS, CodeEnv, CodeProblem, Limits, capabilities, run_program
from rlpt.envs.math_answer import MAX_ANSWER_CHARS, verify_math
from rlpt.framework.environment import Prompt

ROOT = Path(__file__).parents[1]
SECRET = "HIDDEN-" + secrets.token_hex(8)          # the expected output of a problem no program can solve honestly
LIM = Limits(cpu_s=1, wall_s=2.0, verify_wall_s=3.0, mem_bytes=256 << 20, scratch_bytes=8 << 20, nproc=8,
             output_bytes=4096)
SUM = CodeProblem("sum", [("1 2\n", "3"), ("5 5\n", "10"), ("-3 3\n", "0")])
HOST = {"dataset": f"/tmp/rlpt_hostile_data_{SECRET}/tests.jsonl", "tmp": f"/tmp/rlpt_hostile_{SECRET}.txt",
        "shm": f"/dev/shm/rlpt_hostile_{SECRET}", "sock": f"/tmp/rlpt_hostile_{SECRET[-6:]}.sock",
        "abstract": f"\0rlpt_hostile_{SECRET[-6:]}"}


@dataclass
class Case:
    name: str
    code: str
    kind: str            # "steal": SECRET problem; "spoof": SUM, reward 0; "honest": SUM, reward 1; "run": see CHECKS
    check: object = None  # for "run": RunResult -> bool


def steal(name, code):
    return Case(name, code, "steal")


READ = "import sys\ntry:\n    print(open({path!r}).read().strip())\nexcept OSError as e:\n    print('blocked', e)\n"
ESCAPE = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nr = {call}\n"
          "print('ESCAPED' if r >= 0 else 'blocked', os.strerror(ctypes.get_errno()))\n")
CASES = [
    # --- reading what holds the reward
    steal("dataset_file", READ.format(path=HOST["dataset"])),
    steal("host_tmp_file", READ.format(path=HOST["tmp"])),
    steal("host_dev_shm", READ.format(path=HOST["shm"])),
    steal("tmp_listing", "import os\n"
                         "hits = [n for d in ('/tmp', '/dev/shm') for n in os.listdir(d) if 'HIDDEN-' in n]\n"
          "print(hits[0][hits[0].index('HIDDEN-'):].split('.')[0] if hits else 'blocked')\n"),
    steal("proc_cmdlines", "import os\nhits = []\nfor p in os.listdir('/proc'):\n    try:\n"
          "        a = open(f'/proc/{p}/cmdline').read().split(chr(0))\n    except OSError:\n        continue\n"
          "    hits += [x for x in a if x.startswith('HIDDEN-')]\nprint(hits[0] if hits else 'blocked')\n"),
    steal("proc_environ", "import os\nhits = []\nfor p in os.listdir('/proc'):\n    try:\n"
          "        e = open(f'/proc/{p}/environ').read().split(chr(0))\n    except OSError:\n        continue\n"
          "    hits += [x.split('=', 1)[1] for x in e if x.startswith('RLPT_HOSTILE=')]\n"
          "print(hits[0] if hits else 'blocked')\n"),
    steal("own_environ", "import os\nprint(os.environ.get('RLPT_HOSTILE', 'blocked'))\n"),
    steal("walk_the_filesystem", "import os, sys\nfor top in ('/tmp', '/dev/shm', '/var/tmp', '/sandbox'):\n"
          "    for d, _, fs in os.walk(top):\n        for f in fs:\n            try:\n"
          "                t = open(os.path.join(d, f), errors='ignore').read(1 << 16)\n"
          "            except OSError:\n                continue\n            if 'HIDDEN-' in t:\n"
          "                print(t[t.index('HIDDEN-'):][:23])\n                sys.exit()\n"),
    steal("unix_socket_file", "import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n"
          f"    s.connect({HOST['sock']!r})\n    print(s.recv(100).decode())\nexcept OSError as e:\n"
          f"    print('blocked', e)\n"),
    steal("abstract_unix_socket", "import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n"
          f"    s.connect({HOST['abstract']!r})\n    print(s.recv(100).decode())\nexcept OSError as e:\n"
          "    print('blocked', e)\n"),
    steal("tcp_localhost", "import socket\ntry:\n    s = socket.create_connection(('127.0.0.1', PORT), timeout=1)\n"
          "    print(s.recv(100).decode())\nexcept OSError as e:\n    print('blocked', e)\n"),
    Case("rlpt_source", "import re, sys\ninp = sys.stdin.read()\ntry:\n"
         f"    src = open({str(ROOT / 'rlpt/envs/code_sandbox.py')!r}).read()\nexcept OSError:\n    sys.exit(1)\n"
         "m = re.search(re.escape(repr(inp)[1:-1]) + r'\", \"([^\"]*)\"', src)\nprint(m.group(1))\n", "source"),
    Case("import_rlpt", "import sys\nsys.path[:0] = [" + repr(str(ROOT)) + "]\nfrom rlpt.envs.code_sandbox import "
         "PROBLEMS\nd = {i: o for p in PROBLEMS for i, o in p.tests}\nprint(d[sys.stdin.read()])\n", "source"),
    # --- spoofing the verdict (the SUM problem; none of these computes a sum)
    Case("print_pass", "print('PASS')\nprint('tests passed: 3/3')\n"
                       "print('all tests passed', file=__import__('sys').stderr)\n", "spoof"),
    Case("exit_97", "raise SystemExit(97)", "spoof"),
    Case("exit_125_126_127", "import os\nos._exit(126)", "spoof"),
    Case("killed_by_sigsegv", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "spoof"),
    Case("write_every_fd", "import os\nn = 0\nfor fd in range(3, 1024):\n    try:\n"
         "        os.write(fd, b'{\"exit-code\": 0}\\nPASS\\n')\n        n += 1\n    except OSError:\n        pass\n"
         "print('wrote', n)\n", "spoof"),
    Case("reopen_stdout_truncate", "import os\nprint('3')\nf = open('/proc/self/fd/1', 'w')\nf.write('3\\n')\n"
         "os.kill(os.getpid(), 9)\n", "spoof"),
    Case("kill_everything", "import os\nfor p in (os.getppid(), 1, -1):\n    try:\n        os.kill(p, 9)\n"
         "    except OSError:\n        pass\nprint('PASS')\n", "spoof"),
    # --- namespaces, privileges, the syscall filter: each prints 'blocked <why>' or 'ESCAPED'
    Case("unshare_user", ESCAPE.format(call="libc.unshare(0x10000000)"), "run"),
    Case("unshare_mount", ESCAPE.format(call="libc.unshare(0x00020000)"), "run"),
    Case("clone_newuser", ESCAPE.format(call="libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)"), "run"),
    Case("clone3", ESCAPE.format(call="libc.syscall(435, 0, 0)"), "run"),
    Case("mount_tmpfs", ESCAPE.format(call="libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)"), "run"),
    Case("setns", ESCAPE.format(call="libc.setns(0, 0)"), "run"),
    Case("ptrace_pid1", ESCAPE.format(call="libc.ptrace(16, 1, 0, 0)"), "run"),
    Case("io_uring", ESCAPE.format(call="libc.syscall(425, 8, ctypes.create_string_buffer(120))"), "run"),
    Case("bpf", ESCAPE.format(call="libc.syscall(321, 0, 0, 0)"), "run"),
    Case("x32_abi", ESCAPE.format(call="libc.syscall(0x40000000 | 39)"), "run"),
    Case("setuid_root", "import os\ntry:\n    os.setuid(0)\n    print('ESCAPED')\nexcept OSError as e:\n"
         "    print('blocked', e)\n", "run"),
    Case("setuid_binaries", "import os\nsuid = [os.path.join(d, f) for top in ('/usr', '/lib', '/lib64', '/sandbox') "
         "for d, _, fs in os.walk(top) for f in fs if os.lstat(os.path.join(d, f)).st_mode & 0o6000]\n"
         "nnp = open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0]\n"
         "print('ESCAPED' if suid or nnp != '1' else 'blocked', suid, nnp)\n", "run"),
    # --- resources
    Case("fork_bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
                      "", "run"),
    Case("count_processes", "import os, time\nn = 0\nfor _ in range(100):\n    try:\n        if os.fork() == 0:\n"
         "            time.sleep(5)\n            os._exit(0)\n        n += 1\n    except OSError:\n        break\n"
         "print(n)\n", "run"),
    Case("thread_bomb", "import threading, time\nn = 0\ntry:\n    while True:\n"
         "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n        n += 1\n"
         "except RuntimeError:\n    pass\nprint(n)\n", "run"),
    Case("memory_many_children", "import os, time\nfor _ in range(6):\n    if os.fork() == 0:\n"
         "        x = bytearray(150 << 20)\n        time.sleep(1.5)\n        os._exit(0)\ntime.sleep(1.8)\n", "run"),
    Case("fill_scratch", "n = 0\ntry:\n    for i in range(100):\n        with open(f'/tmp/f{i}', 'wb') as f:\n"
         "            for _ in range(4):\n                f.write(b'x' * (256 << 10))\n                f.flush()\n"
         "                n += 256 << 10\nexcept OSError:\n    pass\nprint(n)\n", "run"),
    Case("write_outside_scratch", "out = []\n"
                                  "for p in ('/x', '/dev/shm/x', '/dev/x', '/usr/x', '/sandbox/x', '/proc/x'):\n"
         "    try:\n        open(p, 'w').write('x')\n        out.append(p)\n    except OSError:\n        pass\n"
         "print('ESCAPED' if out else 'blocked', out)\n", "run"),
    Case("huge_output", "import sys\nwhile True:\n    sys.stdout.write('x' * (1 << 20))\n", "run"),
    Case("cpu_loop", "while True:\n    pass\n", "run"),
    Case("sleep_near_wall", "import time\ntime.sleep(1.5)\n" + "a, b = map(int, input().split())\nprint(a + b)\n"
                                                               "", "run"),
    Case("leave_a_daemon", "import os, signal, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
         "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n        signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
         "        time.sleep(60)\n    os._exit(0)\nopen('/tmp/left_behind', 'w').write('x')\nprint('ok')\n", "run"),
    # --- honest programs
    Case("honest_plain", "a, b = map(int, input().split())\nprint(a + b)\n", "honest"),
    Case("honest_stdlib", "import collections, decimal, fractions, functools, heapq, itertools, json, math, re, "
         "statistics, bisect, sys\nnums = [int(x) for x in re.findall(r'-?\\d+', sys.stdin.read())]\n"
         "print(int(fractions.Fraction(sum(nums))) + int(decimal.Decimal(0)) + math.floor(0.5))\n", "honest"),
    Case("honest_threads_and_scratch", "import concurrent.futures as cf, tempfile, sys\n"
                                       "a, b = map(int, input().split())\n"
         "with tempfile.NamedTemporaryFile('w+') as f:\n    f.write(str(a)); f.flush(); f.seek(0); a = int(f.read())\n"
         "with cf.ThreadPoolExecutor(3) as ex:\n    print(sum(ex.map(int, [a, b])))\n", "honest"),
    Case("honest_subprocess", "import subprocess, sys\na, b = map(int, input().split())\n"
         "print(subprocess.run([sys.executable, '-c', f'print({a} + {b})'], capture_output=True, text=True).stdout"
         ".strip())\n", "honest"),
    Case("honest_memory", "x = [0] * (8 << 20)\na, b = map(int, input().split())\nprint(a + b + x[-1])\n", "honest"),
]


def blocked(r):
    return r.status == "ok" and r.stdout.startswith("blocked") and "ESCAPED" not in r.stdout


CHECKS = {   # for "run" cases: what "contained" means, in the limits' own numbers
    "fork_bomb": lambda r: r.status in ("killed", "timeout", "error"),
    "count_processes": lambda r: r.status == "ok" and int(r.stdout) <= LIM.nproc - 1,
    "thread_bomb": lambda r: r.status == "ok" and int(r.stdout) <= LIM.nproc - 1,
    "memory_many_children": lambda r: r.peak_mem_bytes is None or r.peak_mem_bytes <= LIM.mem_bytes,
    "fill_scratch": lambda r: r.status == "ok" and int(r.stdout) <= LIM.scratch_bytes,
    "huge_output": lambda r: r.status in ("error", "killed") and len(r.stdout) <= LIM.output_bytes,
    "cpu_loop": lambda r: r.status in ("killed", "timeout") and r.wall_s < LIM.wall_s + 1.0,
    "leave_a_daemon": lambda r: r.status == "ok" and r.stdout == "ok\n",
}


def _serve(srv: socket.socket, stop: threading.Event):
    srv.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = srv.accept()
        except OSError:
            continue
        conn.sendall(SECRET.encode())
        conn.close()


def _unjailed(code: str, stdin: str) -> str:
    r = subprocess.run([sys.executable, "-I", "-c", code], input=stdin, capture_output=True, text=True, timeout=30,
                       env={**os.environ})
    return r.stdout.strip()


@pytest.fixture(scope="module")
def results():
    """Plant the secrets on the host, run every case (jailed, and the stealers also unjailed), clean up."""
    capabilities()
    Path(HOST["dataset"]).parent.mkdir(mode=0o755)
    for k in ("dataset", "tmp", "shm"):
        Path(HOST[k]).write_text(SECRET + "\n")
        os.chmod(HOST[k], 0o644)
    servers = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX), socket.socket()]
    servers[0].bind(HOST["sock"])
    os.chmod(HOST["sock"], 0o777)
    servers[1].bind(HOST["abstract"])
    servers[2].bind(("127.0.0.1", 0))
    port = servers[2].getsockname()[1]
    stop = threading.Event()
    for s in servers:
        s.listen(8)
        threading.Thread(target=_serve, args=(s, stop), daemon=True).start()
    os.environ["RLPT_HOSTILE"] = SECRET        # in our environment and in the holder's, which shows it in /proc
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", SECRET])
    secret_env = CodeEnv([CodeProblem("unsolvable", [("", SECRET)])], limits=LIM)
    sum_env, src_env = CodeEnv([SUM], limits=LIM), CodeEnv(PROBLEMS, limits=LIM)

    def one(case: Case):
        code = case.code.replace("PORT", str(port))
        t0 = time.perf_counter()
        if case.kind == "steal":
            out = (secret_env.verify(Prompt("", [], 0), code), _unjailed(code, ""))
        elif case.kind == "source":
            inputs = [i for p in PROBLEMS for i, _ in p.tests]   # importing rlpt unjailed costs ~4 s: one input
            out = ([src_env.verify(Prompt("", [], i), code) for i in range(len(PROBLEMS))],
                   [_unjailed(code, i) for i in inputs[:None if case.name == "rlpt_source" else 1]])
        elif case.kind in ("spoof", "honest"):
            out = sum_env.verify(Prompt("sum", [], 0), code)
        elif case.name == "sleep_near_wall":
            out = sum_env.verify(Prompt("sum", [], 0), code)
        else:
            out = run_program(code, "1 2\n", LIM)
        return case.name, (out, time.perf_counter() - t0)

    try:
        with ThreadPoolExecutor(4) as pool:
            res = dict(pool.map(one, CASES))
        res["_next_run"] = run_program("import os\nprint(sorted(os.listdir('/tmp')))\n", limits=LIM)
    finally:
        stop.set()
        holder.kill()
        holder.wait()
        os.environ.pop("RLPT_HOSTILE", None)
        for s in servers:
            s.close()
        for k in ("dataset", "tmp", "shm", "sock"):
            Path(HOST[k]).unlink(missing_ok=True)
        Path(HOST["dataset"]).parent.rmdir()
    return res


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.kind in ("steal", "source")], ids=lambda c: c.name)
def test_stealing_the_reward_scores_zero(results, case):
    (jailed, unjailed), _ = results[case.name]
    if case.kind == "steal":
        assert jailed.reward == 0.0 and "sandbox_error" not in jailed.info
        assert unjailed == SECRET                    # the same program, unjailed, steals it
    else:
        assert [v.reward for v in jailed] == [0.0] * len(PROBLEMS)
        assert unjailed == [o for p in PROBLEMS for _, o in p.tests][:len(unjailed)]


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "spoof"], ids=lambda c: c.name)
def test_spoofing_the_verdict_scores_zero_and_is_never_a_sandbox_error(results, case):
    v, _ = results[case.name]
    assert v.reward == 0.0 and not v.info["correct"] and "sandbox_error" not in v.info


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "run" and c.name not in CHECKS
                                  and c.name != "sleep_near_wall"], ids=lambda c: c.name)
def test_escapes_are_refused(results, case):
    r, _ = results[case.name]
    assert blocked(r), r


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_resource_attacks_stay_inside_the_limits(results, name):
    r, took = results[name]
    assert CHECKS[name](r), r
    assert took < LIM.wall_s + 2.0


@pytest.mark.slow
def test_sleeping_near_the_wall_clock_costs_one_verify_clock(results):
    v, took = results["sleep_near_wall"]
    assert v.info["tests_passed"] <= 1 and took < LIM.verify_wall_s + 1.0


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "honest"], ids=lambda c: c.name)
def test_honest_programs_pass(results, case):
    v, _ = results[case.name]
    assert v.reward == 1.0 and v.info["correct"], v.info


@pytest.mark.slow
def test_nothing_survives(results):
    """No process of a sandbox uid, no run cgroup, no host folder; the next run's /tmp is empty."""
    assert results["_next_run"].stdout == "[]\n"
    time.sleep(0.2)
    live = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if 60000 <= uid < 65000 and state != "Z":
            live.append(pid)
    assert live == []
    root = jail.cgroup_root()
    for base in root.bases if root else ():
        assert not [n for n in os.listdir(base) if n.startswith(f"rlpt-sbx-{os.getpid()}-")]
    assert not [n for n in os.listdir("/tmp") if n.startswith("rlpt_sbx_")]


# --- hostile math answers (fast: not slow) -------------------------------------------------------------------------
@pytest.mark.parametrize("answer", ["\\boxed{9^{9^{9^{9^{9}}}}}", "\\boxed{(x+1)^{99999}-(x+1)^{99998}}"])
def test_math_answer_that_takes_forever_is_cut_at_the_time_cap(answer, caplog):
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="rlpt.envs.math_answer"):
        r, info = verify_math(answer, "5/6", time_s=0.3)
    # cut, not finished: uncut, either answer runs for minutes to forever. 5 s, not a bound near the 0.3 s cap: on
    # a loaded CI machine the wall clock around the cut stretched to 1.2 s (the cap is ITIMER_REAL; the first case
    # also pays sympy's lazy imports), and a timed bound near the cap made this test flaky there
    assert (r, info["reject"]) == (0.0, "verify over 0.3s") and time.perf_counter() - t0 < 5.0
    assert "took over 0.3s" in caplog.text


def test_math_answer_too_long_is_refused_unparsed_and_logged_as_a_preview(caplog):
    huge = "\\boxed{" + "1+" * 500_000 + "1}"
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="rlpt.envs.math_answer"):
        r, info = verify_math(huge, "5/6")
    assert r == 0.0 and info["reject"] == f"answer longer than {MAX_ANSWER_CHARS} chars"
    # refused unparsed: parsing a 10^6-character sum takes minutes; 2 s leaves room for a loaded machine
    assert time.perf_counter() - t0 < 2.0 and len(caplog.text) < 400 and "(1000001 chars)" in caplog.text
    assert verify_math("\\boxed{5/6}", "5/6")[0] == 1.0          # the caps leave honest answers alone


def test_math_time_cap_fires_again_after_a_bare_except_swallows_it():
    """A bare `except:` in the interrupted code (sympy has some) eats one VerifyTimeout; the deadline's alarm
    repeats (every RETRY_S) until the block ends, so the next one still stops it. A one-shot alarm hung CI here."""
    from rlpt.envs.math_answer import RETRY_S, VerifyTimeout, time_cap

    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    swallowed = []
    t0 = time.perf_counter()
    with pytest.raises(VerifyTimeout):
        with time_cap(0.1):
            try:
                spin(1.0)
            except BaseException as e:  # noqa: BLE001 - the hostile code under test
                swallowed.append(e)
            spin(5.0)
    assert [type(e) for e in swallowed] == [VerifyTimeout]
    assert time.perf_counter() - t0 < 0.1 + 10 * RETRY_S + 0.5      # not the 5 s the second spin asks for
