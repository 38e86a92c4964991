"""Rate limiting per API key: a token bucket each, in this process's memory.

Enough for one API process. Behind several replicas each one enforces the limit on its own
share of the traffic (a key gets up to N times the rate); a shared limit would keep the buckets
in Redis instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    """``take(key)`` spends one token of ``key``'s bucket, which holds up to ``burst`` tokens
    and refills at ``rate_per_s``; ``rate_per_s <= 0`` turns limiting off."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate_per_s
        self.burst = max(1, burst)
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when last counted)
        self.lock = threading.Lock()  # sync routes and dependencies run on several threads

    def take(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        with self.lock:
            now = self.clock()
            tokens, then = self.buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens >= 1:
                self.buckets[key] = (tokens - 1, now)
                return 0.0
            self.buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
