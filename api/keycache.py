"""Checked API keys, remembered for a few seconds so that a hot poll costs no key lookup.

A key found live is trusted for ``GRPO_API_KEY_CACHE_S`` seconds by the process that checked it:
revoking a key takes effect within that time on every API process. Unknown and revoked keys are
never remembered, so a new key works at once and a bad one is looked up (and refused) each time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from cachetools import TTLCache

from jobs.keys import hash_token

MAX_KEYS = 10_000


class CheckedKey(NamedTuple):
    id: str
    owner: str


class KeyCache:
    """Used from the event loop's thread only (``current_owner`` is ``async``), hence no lock."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.keys: TTLCache[str, CheckedKey] | None = (
            TTLCache(maxsize=MAX_KEYS, ttl=ttl_s, timer=clock) if ttl_s > 0 else None
        )

    def get(self, token: str) -> CheckedKey | None:
        return None if self.keys is None else self.keys.get(hash_token(token))

    def put(self, token: str, key: CheckedKey) -> None:
        if self.keys is not None:
            self.keys[hash_token(token)] = key
