"""Sending a request again when the answer says to: 429, 5xx, or no answer at all.

Every request the client sends is safe to repeat: reads and cancel/pause/resume are idempotent,
and creates carry an ``Idempotency-Key`` that stays the same across the retries of one call.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from grpo_client.errors import GrpoError


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 4  # attempts after the first
    backoff_s: float = 0.5  # the first wait without a Retry-After; doubled each time
    max_wait_s: float = 30.0  # no single wait is longer, Retry-After included
    statuses: frozenset[int] = frozenset({429, 500, 502, 503, 504})

    def wait_s(self, attempt: int, response: httpx.Response | None) -> float:
        """How long to wait before retry number ``attempt`` (0-based)."""
        told = retry_after_s(response) if response is not None else None
        if told is not None:
            return min(told, self.max_wait_s)
        return min(self.backoff_s * 2**attempt, self.max_wait_s) * random.uniform(0.5, 1.0)


def retry_after_s(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (it is either seconds or an HTTP date)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def send(
    http: httpx.Client,
    build: Callable[[], httpx.Request],
    policy: RetryPolicy,
    *,
    stream: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> httpx.Response:
    """The response to ``build()``, retried per ``policy``; raises ``GrpoError`` for an error
    status, or when the server cannot be reached after the last retry. ``build`` is called for
    each attempt (an upload reopens its file)."""
    for attempt in range(policy.max_retries + 1):
        last = attempt == policy.max_retries
        request = build()
        try:
            response = http.send(request, stream=stream)
        except httpx.TransportError as exc:
            if last:
                raise GrpoError(
                    f"cannot reach {request.url.copy_with(query=None)}: {exc or type(exc).__name__}",
                    code="connection_error",
                ) from exc
            sleep(policy.wait_s(attempt, None))
            continue
        if response.is_success:
            return response
        # a 409 with Retry-After: a request with the same Idempotency-Key is still being processed
        retryable = response.status_code in policy.statuses or (
            response.status_code == 409 and "retry-after" in response.headers
        )
        if last or not retryable:
            response.read()
            response.close()
            raise GrpoError.from_response(response)
        response.close()
        sleep(policy.wait_s(attempt, response))
    raise AssertionError("unreachable")
