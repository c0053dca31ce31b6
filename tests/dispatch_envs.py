"""Verifiers for tests/test_dispatch.py, in a module of their own: a pool's workers import the env's module, and
this one imports only what the fork server already holds (rlpt.framework.environment), not pytest or conftest,
so a worker starts in milliseconds. (Python 3.11's fork server ignores the parent's sys.path when it preloads, so
it cannot preload a module of tests/ itself.)"""
from __future__ import annotations

import os
import random
import signal
import time

from rlpt.framework.environment import ArithmeticEnv, Prompt, Verdict


class ScriptedEnv:
    """A verifier told by the response what to do: "sleep <s> <reward>", "hang" (ignores the timeout signal),
    "die", "raise"; the verdict records the worker's pid and when it finished."""

    def verify(self, prompt: Prompt, response: str) -> Verdict:
        cmd, *args = response.split()
        if cmd == "sleep":
            time.sleep(float(args[0]))
            return Verdict(float(args[1]), {"pid": os.getpid(), "done": time.time(), "prompt": prompt.text})
        if cmd == "hang":
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])   # a verifier deaf to the soft timeout
            time.sleep(60)
        if cmd == "die":
            os._exit(3)
        raise RuntimeError("the verifier failed on this response")


class DelayedArithmetic(ArithmeticEnv):
    """The arithmetic verifier after a random wait (0–20 ms, from the response): verdicts finish out of order."""

    def verify(self, prompt, response):
        time.sleep(random.Random(response).uniform(0, 0.02))
        return super().verify(prompt, response)
