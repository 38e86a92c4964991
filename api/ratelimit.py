"""Rate limiting per API key: a token bucket each, shared through Redis or kept in this process.

With a Redis broker (``GRPO_BROKER_URL=redis://...``) every API process and replica spends from
the same bucket, kept in Redis and updated by one Lua script (atomic: two replicas cannot both
spend the last token). The embedded default has no Redis: its buckets live in the one API
process's memory, and behind several processes each would enforce the limit on its own share of
the traffic (a key would get up to N times the rate).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import redis
import redis.asyncio
from redis.commands.core import AsyncScript

from jobs.settings import Settings

logger = logging.getLogger(__name__)


class RateLimiter:
    """``take(key)`` spends one token of ``key``'s bucket, which holds up to ``burst`` tokens
    and refills at ``rate_per_s``; ``rate_per_s <= 0`` turns limiting off."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate_per_s
        self.burst = max(1, burst)
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when last counted)
        self.lock = threading.Lock()  # the Redis limiter's fallback runs on several threads

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


# The same bucket as RateLimiter.take, in Redis, spending up to ARGV[3] tokens at once (at least
# one, or none): a hash {tokens, at} per key, timed by the Redis server's clock (replicas' clocks
# may differ) and expiring once it would be full again, when forgetting it changes nothing (or
# after a day, for a rate too slow to matter). Returns {tokens granted, the wait in seconds as a
# string} (Redis would truncate a Lua number to an integer).
TAKE_SCRIPT = """
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(bucket[1]), tonumber(bucket[2])
if tokens == nil or at == nil then
  tokens, at = burst, now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local granted, wait = 0, 0
if tokens >= 1 then
  granted = math.min(want, math.floor(tokens))
  tokens = tokens - granted
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.min(math.ceil(burst / rate * 1000) + 1000, 86400000))
return {granted, string.format('%.6f', wait)}
"""


class RedisRateLimiter:
    """Token buckets in Redis under ``<prefix>ratelimit:<key>``, shared by every API process.

    A key sending fast costs Redis a fraction of a call per request: each process takes its
    tokens from the shared bucket a few at a time (as many as the key's rate refills in
    ``lease_s``, up to a tenth of its burst) and spends them from memory; tokens not spent within
    ``lease_s`` are dropped, never handed back, so that the processes together never exceed the
    shared bucket (a process may 429 while another holds a few unspent tokens). A key at a rate
    under 1 / ``lease_s`` per second takes one token per call: exactly the shared bucket.

    ``take`` is a coroutine (redis' asyncio client: no thread hop on the hottest path; one client
    per event loop, made on first use in it). When Redis cannot be reached (or errs) it fails
    open: the request is counted against this process's own bucket instead (the limit a single
    process enforces), a warning is logged once per outage, and Redis is tried again
    ``retry_after_s`` later. A Redis outage must not turn every request into a 500, nor make
    every request wait for a connection timeout.
    """

    retry_after_s = 5.0
    timeout_s = 0.5  # to connect and to answer: a healthy Redis on the same network takes a millisecond
    lease_s = 0.1
    max_lease = 1000

    def __init__(self, url: str, prefix: str, rate_per_s: float, burst: int):
        self.rate = rate_per_s
        self.burst = max(1, burst)
        self.lease_size = max(1, min(int(rate_per_s * self.lease_s), self.burst // 10, self.max_lease))
        self.prefix = f"{prefix}ratelimit:"
        self.url = url
        self.loop: asyncio.AbstractEventLoop | None = None
        self.client: redis.asyncio.Redis | None = None  # and its script: made in the first loop that takes
        self.script: AsyncScript | None = None
        self.leases: dict[str, tuple[int, float]] = {}  # key -> (tokens taken and unspent, when they lapse)
        self.refills: dict[str, asyncio.Future[float | None]] = {}  # key -> the call to Redis under way
        self.fallback = RateLimiter(rate_per_s, burst)
        self.failing = False
        self.down_until = 0.0  # monotonic time before which Redis is not tried again

    def _script(self) -> AsyncScript:
        loop = asyncio.get_running_loop()
        if self.loop is not loop or self.script is None:  # asyncio connections belong to one loop
            self.loop = loop
            self.client = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s
            )
            self.script = self.client.register_script(TAKE_SCRIPT)
        return self.script

    def _spend_leased(self, key: str) -> bool:
        tokens, lapses = self.leases.get(key, (0, 0.0))
        if tokens < 1 or time.monotonic() >= lapses:
            return False
        self.leases[key] = (tokens - 1, lapses)
        return True

    async def take(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        while not self._spend_leased(key):
            if time.monotonic() < self.down_until:
                return self.fallback.take(key)
            # One call to Redis per key at a time: the requests arriving meanwhile share its tokens.
            refill = self.refills.get(key)
            if refill is None or refill.done() or refill.get_loop() is not asyncio.get_running_loop():
                refill = self.refills[key] = asyncio.ensure_future(self._refill(key))
            wait = await asyncio.shield(refill)
            if wait is None:  # Redis failed
                return self.fallback.take(key)
            if wait:
                return wait
        return 0.0

    async def _refill(self, key: str) -> float | None:
        """Lease tokens of ``key`` from Redis: 0 when some were granted, else the wait; ``None``
        when Redis failed."""
        try:
            granted, wait = await self._script()(
                keys=[self.prefix + key], args=[self.rate, self.burst, self.lease_size]
            )
        except (redis.RedisError, OSError) as exc:
            if not self.failing:  # once per outage, not once per request
                logger.warning(
                    "rate limiting: Redis failed (%s); each API process limits keys on its own "
                    "until Redis answers again (tried every %gs)",
                    exc,
                    self.retry_after_s,
                )
            self.failing = True
            self.down_until = time.monotonic() + self.retry_after_s
            return None
        if self.failing:
            self.failing = False
            logger.warning("rate limiting: Redis answers again; API processes share each key's bucket again")
        if int(granted):
            self.leases[key] = (int(granted), time.monotonic() + self.lease_s)
            return 0.0
        return float(wait)

    async def close(self) -> None:
        if self.client is not None and self.loop is asyncio.get_running_loop():
            await self.client.aclose()
        self.client = None


def make_rate_limiter(settings: Settings) -> RateLimiter | RedisRateLimiter:
    """Shared buckets in Redis when the broker is Redis, this process's buckets otherwise."""
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return RedisRateLimiter(
            settings.broker_url,
            settings.broker_key_prefix,
            settings.rate_limit_per_s,
            settings.rate_limit_burst,
        )
    return RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
