"""The verifier dispatcher's worker process (rlpt/framework/dispatch.py): verify one response at a time, under a timer.

    worker_main(conn, env_bytes, timeout)   a worker's life: unpickle the env, say ready, verify (key, prompt, text)
    VerifyTimeout                           raised in the worker's main thread when its verify runs past `timeout`
    timeout_verdict(timeout, how)           reward 0 with `verify_error` saying which deadline stopped it

The soft deadline lives here: a timer thread sends TIMEOUT_SIGNAL to the worker's main thread, whose handler raises
VerifyTimeout while a verify is armed. The hard deadline (kill and replace the worker) is the parent's.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

from rlpt.framework.environment import Verdict, safe_verify


class VerifyTimeout(BaseException):
    """Raised inside a worker's verify by its SIGALRM timer (BaseException: `except Exception` lets it pass)."""


def timeout_verdict(timeout: float, how: str) -> Verdict:
    return Verdict(0.0, {"verify_error": f"timeout: verify took longer than rollout.verify_timeout={timeout:g} s "
                                         f"({how})", "verify_timeout": True})


# -- the worker process ---------------------------------------------------------------------------------------
TIMEOUT_SIGNAL = signal.SIGUSR1     # not SIGALRM: a verifier may arm its own alarm (math_answer's time_cap does)
_armed = False                      # a signal that lands between verifies is ignored


def _on_timeout(signum, frame):
    if _armed:
        raise VerifyTimeout


def worker_main(conn: Connection, env_bytes: bytes, timeout: float) -> None:
    """A worker's life: unpickle the env, say ready, then verify one (key, prompt, text) at a time until told to
    stop (None) or the parent is gone (EOF). A timer thread signals the main thread when a verify runs over."""
    global _armed
    if "torch" in sys.modules:     # the sampler owns the cores
        sys.modules["torch"].set_num_threads(1)
    try:
        env = pickle.loads(env_bytes)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it where the caller sees it
        conn.send(("failed", traceback.format_exc()))
        return
    signal.signal(TIMEOUT_SIGNAL, _on_timeout)
    conn.send(("ready", os.getpid()))
    main = threading.main_thread().ident
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        key, prompt, text = task
        t0 = time.perf_counter()
        timer = threading.Timer(timeout, signal.pthread_kill, (main, TIMEOUT_SIGNAL))
        try:
            _armed = True
            timer.start()
            try:
                verdict, status = safe_verify(env, prompt, text), "ok"
            finally:
                _armed = False
                timer.cancel()
        except VerifyTimeout:
            verdict, status = timeout_verdict(timeout, "stopped in the worker"), "timeout"
        conn.send(("done", (key, verdict, time.perf_counter() - t0, status)))
