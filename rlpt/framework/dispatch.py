"""The verifier dispatcher (lesson 28): verification in a pool of worker processes, overlapped with generation.

    pool = VerifierPool(env, workers=2, timeout=30.0)   # rollout.verify_workers, rollout.verify_timeout
    pool.submit(key, prompt, text)                       # the moment a sequence finishes; returns at once
    verdicts = pool.gather(keys)                         # {key: Verdict}, whatever order they finished in
    pool.take_stats()                                    # verify/* since the last call
    pool.close()

Why: a code sandbox takes 0.1–5 s per response and a judge or a web tool 5–60 s (lesson 28); called inline after
sampling, the rollout side of a step is the sum τ_R + τ_V and the sampler idles while the verifier waits. With
the verification of each sequence handed to a pool the moment the engine finishes it, the rollout side becomes

    τ_rollout ≈ max(τ_R, τ_V / W) + tail         W = workers; tail = the verifies of the sequences that finish last

(the fix the lesson names: "an async verifier dispatcher (CPU pool) so the GPU never blocks"). Processes, not
threads: a verifier that computes in Python (math_verify, a parser) would otherwise hold the GIL the sampler needs,
and only a process can be killed when a verifier hangs.

Each worker gets a copy of the env (pickled once when the pool starts) and calls `safe_verify(env, prompt, text)`,
so a verifier that raises scores 0 with the reason recorded, as inline. The env's `verify` must therefore depend
only on the prompt, the response and what the env held when the pool started (true of every rlpt verifier:
the rollout's RNG and the prompt sampler stay in the parent). Workers start from a fork server (Python's
`forkserver` method: a clean process that imported rlpt once, forked per worker; safe next to torch's threads,
and a replacement worker starts in milliseconds), run torch at one thread, and leave the cores to the sampler.

Timeouts, never a hang, in two layers:
- soft: each verify runs under a timer of `timeout` seconds in its worker; when it fires (SIGUSR1 to the worker's
  main thread: SIGALRM is left to verifiers that keep their own clock, as math_answer does), `VerifyTimeout`
  (a BaseException, so a verifier's `except Exception` cannot swallow it) unwinds the verifier, its `finally`
  blocks clean up (the code sandbox kills its jail), and the verdict is reward 0 with `verify_error` saying so.
- hard: a verify still running `grace` seconds after that (stuck in C code that never returns to the interpreter,
  or a verifier that blocked the signal) has its worker killed and replaced; the verdict is the same reward 0.
Both count in `verify/timeouts`; the hard ones and workers that died also in `verify/restarts`. A worker that dies
mid-verify (a crash in native code) gives reward 0 with the exit code, and is replaced.

Results are keyed by what the caller passed to `submit` (the rollout uses the sample's index in its batch), so the
order in which verifies finish never matters. A dispatcher thread in the parent hands queued verifies to idle
workers, collects results and enforces the hard deadline; the caller's thread only submits and gathers.
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from rlpt.framework.environment import Prompt, Verdict
from rlpt.framework.verify_worker import VerifyTimeout, timeout_verdict, worker_main  # noqa: F401  (VerifyTimeout: re-exported)

KILL_GRACE_S = 2.0      # hard deadline = timeout + this: time for the soft timeout's cleanup (a jail's kill)


# -- the parent side ------------------------------------------------------------------------------------------
@dataclass
class _Worker:
    process: Any                        # multiprocessing Process
    conn: Connection
    ready: bool = False
    task: tuple | None = None           # (key, prompt, text) in flight
    sent: float = 0.0                   # perf_counter when it was handed out


@dataclass
class _Stats:
    timeouts: int = 0
    restarts: int = 0
    latencies: list[float] = field(default_factory=list)   # seconds per verify, as the worker measured it
    first_sent: float | None = None     # perf_counter of the first verify handed out
    last_done: float | None = None      # ... and of the last verdict received

    def as_metrics(self) -> dict:
        lat = self.latencies
        out = {"verify/timeouts": float(self.timeouts), "verify/restarts": float(self.restarts),
               "verify/count": float(len(lat)), "verify/busy": sum(lat)}
        if lat:
            out |= {"verify/latency_mean": sum(lat) / len(lat), "verify/latency_max": max(lat)}
        return out


class VerifierPool:
    def __init__(self, env, workers: int, timeout: float = 30.0, grace: float = KILL_GRACE_S):
        if workers < 1:
            raise ValueError(f"rollout.verify_workers must be >= 1 for a pool (0 verifies inline), got {workers}")
        if not timeout > 0:
            raise ValueError(f"rollout.verify_timeout must be > 0 seconds, got {timeout}")
        try:
            self._env_bytes = pickle.dumps(env)
        except Exception as e:  # noqa: BLE001 - any pickling failure means the same thing here
            raise ValueError(f"rollout.verify_workers={workers}: the env {type(env).__name__} cannot be copied into "
                             f"a verifier process ({type(e).__name__}: {e}); use rollout.verify_workers=0 (inline)"
                             ) from None
        self.timeout, self.grace = float(timeout), float(grace)
        self._ctx = mp.get_context("forkserver")
        # what the fork server imports once for all its workers (read only when it starts: once per process);
        # "__main__" too, as by default, so that a worker does not re-import the main module (a script, pytest,
        # a Ray worker) on its own
        module = type(env).__module__
        preload = ["__main__", "rlpt.framework.verify_worker"] + ([module] * (module != "__main__"))
        self._ctx.set_forkserver_preload(preload)
        self._lock = threading.Condition()
        self._queue: deque = deque()
        self._results: dict = {}             # key -> (Verdict, latency)
        self._pending: set = set()           # keys submitted and not yet gathered
        self._stats = _Stats()
        self._error: str | None = None
        self._closed = False
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        t_start = time.perf_counter()
        self._workers = [self._spawn() for _ in range(workers)]
        # the thread holds the pool weakly, so a pool nobody holds is collected and its workers stopped
        self._thread = threading.Thread(target=_serve, args=(weakref.ref(self), self._wake_r), daemon=True,
                                        name="rlpt-verifier-dispatch")
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._wake_w)
        self._wait_ready()
        self.start_s = time.perf_counter() - t_start   # once per pool: the fork server imports rlpt, workers the env

    # -- the caller's side ----------------------------------------------------------------------------
    def submit(self, key, prompt: Prompt, text: str) -> None:
        """Queue one verify; returns at once. `key` names the result in `gather` (unique until gathered)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("submit() on a closed VerifierPool")
            if key in self._pending:
                raise ValueError(f"verify key {key!r} is already pending: keys must be unique until gathered")
            self._pending.add(key)
            self._queue.append((key, prompt, text))
        self._wake()

    def gather(self, keys) -> dict:
        """{key: Verdict} for every key, blocking until all are in (each verify is bounded by the timeouts)."""
        keys = list(keys)
        with self._lock:
            missing = [k for k in keys if k not in self._pending]
            if missing:
                raise KeyError(f"gather() of keys never submitted (or already gathered): {missing[:4]}")
            while not all(k in self._results for k in keys):
                if self._error is not None:
                    raise RuntimeError(f"the verifier pool failed: {self._error}")
                if not self._thread.is_alive():
                    raise RuntimeError("the verifier pool's dispatcher thread stopped (pool closed?)")
                self._lock.wait(0.5)
            out = {}
            for k in keys:
                out[k] = self._results.pop(k)[0]
                self._pending.discard(k)
            return out

    def _wait_ready(self, limit: float = 300.0) -> None:
        """Block until every worker has its env (so a step's timings never hold the pool's start-up)."""
        deadline, error = time.perf_counter() + limit, None
        with self._lock:
            while not all(w.ready for w in self._workers) and error is None:
                if self._error is not None:
                    error = f"the verifier pool failed: {self._error}"
                elif time.perf_counter() > deadline:
                    error = f"the verifier workers did not start within {limit:g} s"
                else:
                    self._lock.wait(0.5)
        if error is not None:
            self.close()
            raise RuntimeError(error)

    def take_stats(self) -> dict:
        """verify/* since the last call (counts, Σ latency = worker-seconds, mean and max latency) and the
        perf_counter times of the first hand-out and the last verdict (`t_first`, `t_last`; None if none)."""
        with self._lock:
            s, self._stats = self._stats, _Stats()
        return {**s.as_metrics(), "t_first": s.first_sent, "t_last": s.last_done}

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._wake()
        self._thread.join(timeout=5)
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the dispatcher thread ------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        p = self._ctx.Process(target=worker_main, args=(child, self._env_bytes, self.timeout), daemon=True,
                              name="rlpt-verifier")
        try:
            p.start()
        except (OSError, EOFError, RuntimeError) as e:   # the fork server died importing the main module
            raise RuntimeError(f"cannot start a verifier worker ({type(e).__name__}: {e}); a script that verifies "
                               f"in a pool (rollout.verify_workers > 0) needs the `if __name__ == '__main__':` "
                               "guard, as the fork server imports the main module") from None
        child.close()
        return _Worker(p, parent)

    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"")
        except OSError:
            pass

    def _tick(self) -> tuple[list[Connection], float | None]:
        """Hand queued verifies to idle workers; what to wait on, and for how long (the next hard deadline)."""
        with self._lock:
            now = time.perf_counter()
            self._assign(now)
            deadlines = [w.sent + self.timeout + self.grace for w in self._workers if w.task is not None]
            return [w.conn for w in self._workers], (max(0.0, min(deadlines) - now) if deadlines else None)

    def _handle(self, ready: list) -> None:
        with self._lock:
            for c in ready:
                if c is self._wake_r:
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                else:
                    w = next((w for w in self._workers if w.conn is c), None)
                    if w is not None:
                        self._receive(w)
            self._kill_overdue(time.perf_counter())
            self._lock.notify_all()

    def _assign(self, now: float) -> None:
        for w in self._workers:
            if not self._queue:
                return
            if w.ready and w.task is None:
                w.task, w.sent = self._queue.popleft(), now
                if self._stats.first_sent is None:
                    self._stats.first_sent = now
                try:
                    w.conn.send(w.task)
                except OSError:          # it died in between: _receive sees the EOF and scores the verify 0
                    pass
                except Exception as e:  # noqa: BLE001 - e.g. a prompt that cannot be pickled: stop, say why
                    self._error = f"cannot hand verify {w.task[0]!r} to a worker: {type(e).__name__}: {e}"
                    w.task = None

    def _receive(self, w: _Worker) -> None:
        try:
            kind, payload = w.conn.recv()
        except (EOFError, OSError):
            if not w.ready and self._error is None:
                w.process.join(timeout=5)
                self._error = (f"a verifier worker exited before it started (exit code {w.process.exitcode}); a "
                               "script that verifies in a pool (rollout.verify_workers > 0) needs the `if __name__ "
                               "== '__main__':` guard, as the fork server re-imports the main module")
            if self._error is not None:      # it could not start: replacing it would fail the same way
                w.conn.close()
                self._workers.remove(w)
                return
            w.process.join(timeout=5)
            self._replace(w, f"verifier worker died (exit code {w.process.exitcode})")
            return
        if kind == "ready":
            w.ready = True
        elif kind == "failed":
            self._error = f"a verifier worker could not start: {payload.strip().splitlines()[-1]}\n{payload}"
        else:
            key, verdict, latency, status = payload
            w.task = None
            self._done(key, verdict, latency, timed_out=status == "timeout")

    def _done(self, key, verdict: Verdict, latency: float, timed_out: bool) -> None:
        self._results[key] = (verdict, latency)
        self._stats.latencies.append(latency)
        self._stats.timeouts += timed_out
        self._stats.last_done = time.perf_counter()

    def _kill_overdue(self, now: float) -> None:
        for w in self._workers:
            if w.task is not None and now > w.sent + self.timeout + self.grace:
                w.process.kill()
                w.process.join(timeout=5)
                self._replace(w, None)

    def _replace(self, w: _Worker, death: str | None) -> None:
        """A worker that died (`death` says how) or was killed past its deadline (None): its verify scores 0,
        a fresh worker takes its place."""
        if w.task is not None:
            key, latency = w.task[0], time.perf_counter() - w.sent
            verdict = timeout_verdict(self.timeout, "worker killed") if death is None else \
                Verdict(0.0, {"verify_error": death})
            self._done(key, verdict, latency, timed_out=death is None)
        self._stats.restarts += 1
        w.conn.close()
        i = self._workers.index(w)
        self._workers[i] = self._spawn()     # in place: the finalizer holds this very list


def _serve(ref: weakref.ref, wake: Connection) -> None:
    """The dispatcher thread: wait for a worker's message, a submit (the wake pipe) or the next hard deadline,
    then let the pool act; never holds the pool while it waits."""
    try:
        while True:
            pool = ref()
            if pool is None or pool._closed:
                return
            conns, timeout = pool._tick()
            del pool
            ready = wait([*conns, wake], timeout)
            pool = ref()
            if pool is None:
                return
            pool._handle(ready)
            del pool
    except (EOFError, OSError, ValueError):   # the pool was shut down under us: its connections are closed
        return


def _shutdown(workers: list[_Worker], wake_w: Connection) -> None:
    """Stop every worker: ask, then kill what has not exited (also run at garbage collection and at exit)."""
    try:
        wake_w.send_bytes(b"")     # the dispatcher thread wakes and finds the pool gone or closed
    except OSError:
        pass
    for w in workers:
        try:
            w.conn.send(None)
        except OSError:
            pass
    deadline = time.perf_counter() + 2.0
    for w in workers:
        w.process.join(timeout=max(0.0, deadline - time.perf_counter()))
        if w.process.is_alive():
            w.process.kill()
            w.process.join(timeout=5)
        w.conn.close()
    wake_w.close()
