"""Stopping a scoring batch from another thread: ``StopSignal``.

The API's reward dry-run scores in a worker thread and must give its slot back when the client
hangs up or the request's time budget runs out. ``RewardSuite.__call__(..., stop=signal)`` makes
``signal`` the batch's ``current_stop()`` (a context variable: the pools that score completions in
parallel copy the context into their threads). Then:

- the suite checks it between reward functions, and per-completion rewards between completions;
- a running sandbox registers a kill of its process group, an ``http`` reward a shutdown of its
  sockets: ``stop(reason)`` runs them at once, so nothing waits out a sandbox's or a scoring
  endpoint's timeout;
- the interrupted work raises ``ScoringStopped(reason)``, which is not a reward error: the batch
  has no result.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class ScoringStopped(Exception):
    """The batch was stopped from outside (``StopSignal.stop(reason)``): there is no result."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class StopSignal:
    """Set once, from any thread; work in flight sees it and its processes and sockets are cut."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._on_stop: dict[int, Callable[[], None]] = {}
        self._next_id = 0
        self.reason: str | None = None

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    def stop(self, reason: str) -> None:
        """Stop the work (the first reason wins) and run every registered kill now."""
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            kills = list(self._on_stop.values())
        for kill in kills:
            try:
                kill()
            except OSError:
                pass  # already gone

    def check(self) -> None:
        """ScoringStopped if the work was stopped."""
        if self._event.is_set():
            raise ScoringStopped(self.reason or "stopped")

    def sleep(self, seconds: float) -> None:
        """``time.sleep`` that ends early, with ScoringStopped, when the work is stopped."""
        self._event.wait(seconds)
        self.check()

    @contextmanager
    def on_stop(self, kill: Callable[[], None]) -> Iterator[None]:
        """Run ``kill`` if the work is stopped while the block runs (at once if it already was)."""
        with self._lock:
            key, self._next_id = self._next_id, self._next_id + 1
            self._on_stop[key] = kill
            already = self._event.is_set()
        try:
            if already:
                kill()
            yield
        finally:
            with self._lock:
                del self._on_stop[key]


_current: ContextVar[StopSignal | None] = ContextVar("grpo_reward_stop", default=None)


def current_stop() -> StopSignal | None:
    """The signal of the batch being scored in this context, if its caller gave one."""
    return _current.get()


@contextmanager
def scoring_under(stop: StopSignal | None) -> Iterator[None]:
    token = _current.set(stop)
    try:
        yield
    finally:
        _current.reset(token)


def check_stop() -> None:
    """ScoringStopped if this context's batch was stopped; nothing when there is no signal."""
    stop = _current.get()
    if stop is not None:
        stop.check()
