"""Requests refused from their headers alone (401, 429), with their bodies never read; and a
key's rate limit shared by every API process through Redis, failing open when Redis is down."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient

from api.errors import headers_of
from api.main import create_app
from api.ratelimit import RateLimiter, RedisRateLimiter, make_rate_limiter
from jobs.errors import RateLimited
from tests.service.factories import api_key, bearer
from tests.service.faults import RedisServer
from tests.service.live import serve

MULTIPART = "multipart/form-data; boundary=xyz"
LARGE = 400 << 20  # within GRPO_MAX_DATASET_BYTES: only authentication can refuse it early


def call_unread(app: Any, path: str, content_type: str, headers: dict[str, str]) -> tuple[int, dict, int]:
    """POST ``path`` straight to the ASGI app, declaring a LARGE body: (status, headers, how many
    times the app asked for a piece of the body)."""
    asked = 0
    started: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        nonlocal asked
        asked += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.update(message)

    raw = {"content-type": content_type, "content-length": str(LARGE), "host": "testserver", **headers}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.encode(), value.encode()) for name, value in raw.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    anyio.run(app, scope, receive, send)
    return started["status"], {k.decode(): v.decode() for k, v in started["headers"]}, asked


# -- refused before the body --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/datasets", MULTIPART),
        ("/v1/files", MULTIPART),
        ("/v1/jobs", "application/json"),
        ("/v1/rewards/run", "application/json"),
    ],
)
@pytest.mark.parametrize("authorization", [None, "Bearer grpo_not-a-real-key", "Basic YWxpY2U6c2VjcmV0"])
def test_an_unauthenticated_body_is_answered_401_unread(
    settings, sent, path, content_type, authorization
) -> None:
    app = create_app(settings, send=sent.append)
    headers = {"authorization": authorization} if authorization else {}
    status, response_headers, asked = call_unread(app, path, content_type, headers)
    assert (status, asked) == (401, 0)
    assert response_headers["www-authenticate"] == 'Bearer realm="grpo"'


def test_a_rate_limited_body_is_answered_429_unread(settings, sent) -> None:
    settings.rate_limit_per_s, settings.rate_limit_burst = 0.01, 1
    app = create_app(settings, send=sent.append)
    key = bearer(api_key(settings))
    with TestClient(app, headers=key) as client:
        assert client.get("/v1/datasets").status_code == 200  # the one token
    status, headers, asked = call_unread(
        app, "/v1/datasets", MULTIPART, {k.lower(): v for k, v in key.items()}
    )
    assert (status, asked) == (429, 0) and int(headers["retry-after"]) >= 1


def test_a_401_arrives_while_a_large_upload_has_barely_started(settings, sent) -> None:
    """Over a real socket: the headers announce 400 MiB, a few bytes follow, and the 401 comes
    back at once. A server that read the body first would wait here for the rest, forever."""
    with serve(create_app(settings, send=sent.append)) as url:
        port = int(url.rsplit(":", 1)[1])
        # A server that read the body first would never answer: recv's timeout (generous for a loaded
        # 2-core CI) is what tells, not how fast the 401 came.
        with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
            connection.sendall(
                f"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer grpo_nope\r\n"
                f"Content-Type: {MULTIPART}\r\nContent-Length: {LARGE}\r\n\r\n--xyz\r\n".encode()
            )
            answer = connection.recv(65536)  # raises socket.timeout if the server waits for the body
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b"invalid API key" in answer


# -- the rate limit, shared through Redis ---------------------------------------------------------


def test_the_limiter_is_shared_through_redis_only_when_the_broker_is_redis(settings) -> None:
    assert isinstance(make_rate_limiter(settings), RedisRateLimiter)
    embedded = settings.model_copy(update={"broker_url": "filesystem://"})
    assert isinstance(make_rate_limiter(embedded), RateLimiter)


def test_two_api_processes_together_allow_only_the_burst(settings, sent) -> None:
    settings.rate_limit_per_s, settings.rate_limit_burst = 0.01, 4  # no token refills during the test
    key = bearer(api_key(settings))
    with (
        TestClient(create_app(settings, send=sent.append), headers=key) as one,
        TestClient(create_app(settings, send=sent.append), headers=key) as two,
    ):
        answers = [client.get("/v1/jobs") for _ in range(4) for client in (one, two)]
    assert [answer.status_code for answer in answers] == [200] * 4 + [429] * 4
    assert all(90 <= int(answer.headers["Retry-After"]) <= 100 for answer in answers[4:])  # 1 token at 0.01/s
    for answer in answers[4:]:  # the message says the header's seconds, and which setting it is
        message = answer.json()["error"]["message"]
        assert message.endswith(f"retry in {answer.headers['Retry-After']} s"), message
        assert "rate limit of 0.01 a second (GRPO_RATE_LIMIT_PER_S) in bursts of up to 4" in message, message


@pytest.mark.parametrize(("wait_s", "said"), [(0.0004, 1), (0.04, 1), (1.0, 1), (1.2, 2), (99.01, 100)])
def test_a_429_says_the_seconds_its_retry_after_does(wait_s, said) -> None:
    """A wait under a second was "retry in 0.0 s" beside ``Retry-After: 1``: both round up now."""
    refused = RateLimited(wait_s, rate_per_s=1000, burst=1)
    assert headers_of(refused) == {"Retry-After": str(said)}
    assert refused.message.endswith(f"retry in {said} s"), refused.message


def test_the_redis_bucket_refills_at_its_rate(settings) -> None:
    async def scenario() -> None:
        limiter = RedisRateLimiter(settings.broker_url, settings.broker_key_prefix, rate_per_s=20, burst=2)
        key = f"refill-{time.monotonic_ns()}"
        assert [await limiter.take(key) for _ in range(2)] == [0, 0]
        assert 0 < await limiter.take(key) <= 0.05
        await asyncio.sleep(0.06)  # a token's worth of refill, at least
        assert await limiter.take(key) == 0
        assert (
            0 < await limiter.client.pttl(limiter.prefix + key) <= 2 / 20 * 1000 + 1000
        )  # forgotten once full
        assert await RedisRateLimiter(settings.broker_url, "", rate_per_s=0, burst=1).take(key) == 0  # off
        await limiter.close()

    asyncio.run(scenario())


def test_a_fast_key_takes_its_tokens_from_redis_a_few_at_a_time(settings) -> None:
    async def scenario() -> None:
        limiter = RedisRateLimiter(
            settings.broker_url, settings.broker_key_prefix, rate_per_s=100, burst=1000
        )
        assert limiter.lease_size == 10  # the rate's worth of 0.1 s
        key = f"lease-{time.monotonic_ns()}"

        async def in_redis() -> float:
            return float(await limiter.client.hget(limiter.prefix + key, "tokens"))

        assert await limiter.take(key) == 0
        after_one = await in_redis()
        assert 989 <= after_one <= 991  # ten taken at once (and a token refilled, at most)
        assert [await limiter.take(key) for _ in range(9)] == [0] * 9
        assert await in_redis() == after_one  # the nine spent from memory
        calls = 0
        refill = limiter._refill

        async def counted(key: str) -> float | None:
            nonlocal calls
            calls += 1
            return await refill(key)

        limiter._refill = counted  # type: ignore[method-assign]
        assert await asyncio.gather(*(limiter.take(key) for _ in range(50))) == [0] * 50
        assert calls == 5  # fifty concurrent requests, ten tokens a call: the waiting ones shared each call
        await limiter.close()

    asyncio.run(scenario())


def test_leasing_processes_together_stay_within_the_shared_bucket(settings) -> None:
    async def scenario() -> None:
        one, two = (
            RedisRateLimiter(settings.broker_url, settings.broker_key_prefix, rate_per_s=100, burst=50)
            for _ in range(2)
        )
        key = f"shared-{time.monotonic_ns()}"
        started = time.monotonic()
        waits = await asyncio.gather(*(limiter.take(key) for _ in range(60) for limiter in (one, two)))
        elapsed = time.monotonic() - started
        admitted = waits.count(0)
        assert 50 - 2 * one.lease_size <= admitted <= 50 + 100 * elapsed + 1, (admitted, elapsed)
        assert all(0 < wait <= 0.01 for wait in waits if wait)
        for limiter in (one, two):
            await limiter.close()

    asyncio.run(scenario())


def test_a_redis_outage_fails_open_to_each_process_s_own_bucket(
    settings, sent, tmp_path, caplog, monkeypatch
) -> None:
    redis_server = RedisServer(tmp_path).start()
    monkeypatch.setattr(RedisRateLimiter, "retry_after_s", 0.0)  # try Redis again on every request
    try:
        settings.broker_url = redis_server.url
        settings.rate_limit_per_s, settings.rate_limit_burst = 0.01, 2
        with TestClient(create_app(settings, send=sent.append), headers=bearer(api_key(settings))) as client:

            def statuses() -> list[int]:
                return [client.get("/v1/jobs").status_code for _ in range(3)]

            assert statuses() == [200, 200, 429]  # the shared bucket
            redis_server.stop()
            with caplog.at_level(logging.WARNING, logger="api.ratelimit"):
                assert statuses() == [200, 200, 429]  # this process's own bucket: still limited, no 500
            assert [r.message.split(" (")[0] for r in caplog.records] == [
                "rate limiting: Redis failed"
            ]  # logged once
            caplog.clear()
            redis_server.start()  # empty, on the same port
            with caplog.at_level(logging.WARNING, logger="api.ratelimit"):
                assert statuses() == [200, 200, 429]  # a new shared bucket
            assert "Redis answers again" in caplog.text
    finally:
        redis_server.stop()
