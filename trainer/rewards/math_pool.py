"""Math-verify with a hard time limit on any thread: ``check_math(gold, answer, timeout_s=)``.

math-verify bounds its own work with ``signal.alarm``, which only a process's main thread may
set; the API's dry-run scores in a thread pool, where it would run unbounded, and on any thread
a Python signal handler cannot stop a long computation in C. So every check runs in a child
process (``math_child.py``): the child bounds a request with its own alarm, on its own main
thread, and answers "timeout"; a child that does not answer within the limit and a second more
is killed, and the next check starts a fresh one. Children are reused, a few per process (they
import sympy once, which takes a second or more), and exit when the parent closes their stdin
or dies.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from trainer.rewards.base import RewardError
from trainer.rewards.stop import current_stop

CHILD = Path(__file__).with_name("math_child.py")
MAX_CHILDREN = 2  # checks at once per process; more callers wait for a child
STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine; not counted against a check
KILL_GRACE_S = 1.0  # past the limit, before a child that has not answered is killed


class GoldUnreadable(RewardError):
    """math-verify cannot read the row's answer."""


class _Child:
    """One ``math_child.py`` process and its pipes; used by one thread at a time."""

    def __init__(self, script: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-P", str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )  # a terminal's Ctrl-C is for the parent, which ends the child
        self.pending = b""
        self.ready = False

    def ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if not self.ready:
            try:
                self._read(STARTUP_TIMEOUT_S)
            except TimeoutError:
                raise RewardError(
                    f"math-verify's process did not start within {STARTUP_TIMEOUT_S:g}s"
                ) from None
            self.ready = True
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise RewardError(self._ended()) from None
        return self._read(timeout_s)

    def _read(self, timeout_s: float) -> dict[str, Any]:
        """The next line the child writes, as JSON; TimeoutError past ``timeout_s``."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RewardError(self._ended())
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line)

    def _ended(self) -> str:
        code = self.process.wait(timeout=5)
        return f"math-verify's process ended unexpectedly (exit code {code}); the next check starts a new one"

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._close_pipes()

    def close(self) -> None:
        """Ask it to exit (end of input), and make sure it has."""
        self._close_pipes()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()

    def _close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass


class MathPool:
    """Up to ``size`` children running ``script``, started when needed and kept for the next check."""

    def __init__(self, size: int = MAX_CHILDREN, script: Path = CHILD):
        self.script = script
        self.slots = threading.BoundedSemaphore(size)
        self.lock = threading.Lock()
        self.idle: list[_Child] = []

    def check(self, gold: str, answer: str, *, timeout_s: float) -> float:
        """1.0 if ``answer`` (a completion) is equivalent to ``gold``, else 0.0. RewardError when
        the check timed out or failed; GoldUnreadable when ``gold`` cannot be read."""
        with self.slots:
            child = self._idle_child() or _Child(self.script)
            stop = current_stop()  # a stopped batch kills the child rather than wait for its answer
            try:
                with stop.on_stop(child.process.kill) if stop is not None else nullcontext():
                    reply = child.ask(
                        {"gold": gold, "answer": answer, "timeout_s": timeout_s}, timeout_s + KILL_GRACE_S
                    )
            except TimeoutError:
                child.kill()
                raise RewardError(f"math-verify timed out after {timeout_s:g}s on this completion") from None
            except BaseException:
                child.kill()
                raise
            with self.lock:
                self.idle.append(child)
        if "score" in reply:
            return float(reply["score"])
        if reply.get("timeout"):
            raise RewardError(f"math-verify timed out after {timeout_s:g}s on this completion")
        if reply.get("gold_unreadable"):
            raise GoldUnreadable("math-verify cannot read the row's answer")
        raise RewardError(str(reply.get("error", reply)))

    def _idle_child(self) -> _Child | None:
        with self.lock:
            while self.idle:
                child = self.idle.pop()
                if child.alive():
                    return child
                child.kill()  # died while idle (e.g. the OOM killer): reap it
        return None

    def close(self) -> None:
        with self.lock:
            children, self.idle = self.idle, []
        for child in children:
            child.close()


_pool: MathPool | None = None
_pool_lock = threading.Lock()


def math_pool() -> MathPool:
    """This process's pool, started on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = MathPool()
        return _pool


def check_math(gold: str, answer: str, *, timeout_s: float) -> float:
    return math_pool().check(gold, answer, timeout_s=timeout_s)


def _close_pool() -> None:
    if _pool is not None:
        _pool.close()


def _forget_pool_after_fork() -> None:
    # A forked child (a Celery pool process) must not share its parent's pipes: it starts its own.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


atexit.register(_close_pool)
os.register_at_fork(after_in_child=_forget_pool_after_fork)
