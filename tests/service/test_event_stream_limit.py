"""At most GRPO_MAX_EVENT_STREAMS_PER_KEY event streams (server-sent events) per API key on an API
process, each polling the database: past it, a 429 with Retry-After. Served for real (uvicorn on a
socket), so that streams are open at once and a client hanging up is a closed connection."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from api.main import create_app
from api.streaming import EventStreams
from jobs.db import transaction
from jobs.keys import hash_token
from jobs.models import JobStatus
from jobs.queries import claim_job, finish_job, get_api_key_by_hash, revoke_api_key
from jobs.settings import Settings
from tests.service.factories import api_key, arithmetic_rows, bearer, job_spec, jsonl, wait_for
from tests.service.live import serve

SSE = {"accept": "text/event-stream"}
SETTLE_S = 30  # how long the server may take to notice a stream's end (a generous bound, not timed)


@pytest.fixture
def limited(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"max_event_streams_per_key": 2, "event_poll_interval_s": 0.05, "api_key_cache_s": 0}
    )


@contextmanager
def served(settings: Settings, sent: list[str]) -> Iterator[tuple[str, EventStreams]]:
    app = create_app(settings, send=sent.append)
    with serve(app) as url:
        yield url, app.state.event_streams


def key_id(settings: Settings, secret: str) -> str:
    with transaction(settings.database_url) as session:
        return get_api_key_by_hash(session=session, token_hash=hash_token(secret)).id


def queued_job(http: httpx.Client) -> str:
    dataset = http.post("/v1/datasets", files={"file": ("d.jsonl", jsonl(arithmetic_rows(2)))})
    assert dataset.status_code == 201, dataset.text
    job = http.post("/v1/jobs", json=job_spec(dataset.json()["id"]))
    assert job.status_code == 201, job.text
    return job.json()["id"]  # queued, and no worker: its stream runs until the test ends it


@contextmanager
def stream(http: httpx.Client, job_id: str) -> Iterator[Iterator[str]]:
    """An open event stream (its first line read: the server is sending it); closed on exit."""
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=SSE) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        assert next(lines).startswith("retry:")
        yield lines


def test_a_key_over_its_streams_gets_a_429_until_one_of_them_ends(limited, sent) -> None:
    secret, other_secret = api_key(limited), api_key(limited)  # two keys of one owner
    key = key_id(limited, secret)
    with (
        served(limited, sent) as (url, streams),
        httpx.Client(base_url=url, headers=bearer(secret), timeout=60) as http,
        ExitStack() as open_streams,
    ):
        job_id = queued_job(http)
        first = open_streams.enter_context(ExitStack())
        first.enter_context(stream(http, job_id))
        open_streams.enter_context(stream(http, job_id))
        assert streams.held(key) == 2

        refused = http.get(f"/v1/jobs/{job_id}/events", headers=SSE)
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        retry_after = refused.headers["Retry-After"]
        assert error["code"] == "too_many_event_streams" and int(retry_after) >= 1
        assert "this API key already has 2 event stream(s) open" in error["message"], error["message"]
        assert "(GRPO_MAX_EVENT_STREAMS_PER_KEY) is 2" in error["message"], error["message"]
        assert error["message"].endswith(f"retry in {retry_after} s"), error["message"]
        assert streams.held(key) == 2  # the refused one took nothing
        assert http.get(f"/v1/jobs/{job_id}/events").status_code == 200  # JSON pages are not streams

        # per key: another key of the same owner has slots of its own
        with httpx.Client(base_url=url, headers=bearer(other_secret), timeout=60) as other:
            with stream(other, job_id):
                assert streams.held(key_id(limited, other_secret)) == 1

        first.close()  # the client hangs up: the server gives the slot back once it notices
        wait_for(lambda: streams.held(key) == 1, timeout=SETTLE_S, what="the closed stream's slot")
        open_streams.enter_context(stream(http, job_id))  # accepted again
        assert http.get(f"/v1/jobs/{job_id}/events", headers=SSE).status_code == 429

        # the job ends: both streams end with it, and give their slots back
        with transaction(limited.database_url) as session:
            claim_job(session=session, job_id=job_id, worker="w")
            finish_job(session=session, job_id=job_id, worker="w", status=JobStatus.failed, reason="oom")
        wait_for(lambda: streams.held(key) == 0, timeout=SETTLE_S, what="the ended streams' slots")
        with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=SSE) as ended:
            assert ended.status_code == 200 and "oom" in ended.read().decode()  # sent whole, then closed
    assert sent == [job_id]


def test_a_revoked_keys_streams_give_their_slots_back(limited, sent) -> None:
    secret = api_key(limited)
    key = key_id(limited, secret)
    with (
        served(limited, sent) as (url, streams),
        httpx.Client(base_url=url, headers=bearer(secret), timeout=60) as http,
    ):
        job_id = queued_job(http)
        with stream(http, job_id) as first, stream(http, job_id) as second:
            assert streams.held(key) == 2
            with transaction(limited.database_url) as session:
                revoke_api_key(session=session, key_id=key)
            list(first), list(second)  # both end (a test that hangs here has its answer)
            wait_for(lambda: streams.held(key) == 0, timeout=SETTLE_S, what="the revoked key's slots")


def test_a_slot_is_given_back_once_however_often_released_and_when_dropped_unreleased() -> None:
    streams = EventStreams(per_key=2)
    slot, _ = streams.open("key_a"), streams.open("key_b")
    slot.release()
    slot.release()  # a stream's end and its response's end may both release it
    assert (streams.held("key_a"), streams.held("key_b")) == (0, 1)
    streams.open("key_b")  # a response made but never sent: its slot goes with it
    assert streams.held("key_b") == 1
