"""The polled routes' answers kept in memory (api/cache.py), on PostgreSQL with its real
notifications: answers are kept, dropped when anything writes the job (a worker's own
connection, this process's routes), never kept across a change, and not served while the
listener is down. Writes here go through a separate connection, as a worker's would."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.cache import ResponseCache
from api.main import create_app
from jobs.db import transaction
from jobs.models import Job
from jobs.queries import append_metrics
from tests.service.factories import api_key, bearer, job_spec, upload, wait_for


@pytest.fixture
def api(settings, sent) -> Iterator[TestClient]:
    settings.rate_limit_per_s = 0  # the tests poll as fast as they can
    app = create_app(settings, send=sent.append)
    app.state.change_listener.retry_s = 0.05
    with TestClient(app, headers=bearer(api_key(settings))) as client:
        wait_for(
            lambda: app.state.response_cache.serving,
            timeout=10,
            what="the listener to connect",
            interval=0.01,
        )
        yield client


@pytest.fixture
def job_id(api) -> str:
    return api.post("/v1/jobs", json=job_spec(upload(api).json()["id"])).json()["id"]


def cache_of(client: TestClient) -> ResponseCache:
    return client.app.state.response_cache


def write_step(settings, job_id: str, step: int, reward: float) -> None:
    """What a worker's step commits: the step's metrics and the job's step, in one transaction."""
    with transaction(settings.database_url) as session:
        append_metrics(session=session, job_id=job_id, step=step, metrics={"reward": reward})
        session.execute(update(Job).where(Job.id == job_id).values(step=step))


def test_a_polled_job_is_answered_from_memory_until_a_worker_writes_it(api, settings, job_id) -> None:
    cache = cache_of(api)
    first = api.get(f"/v1/jobs/{job_id}").json()
    hits = cache.hits
    assert api.get(f"/v1/jobs/{job_id}").json() == first
    assert cache.hits == hits + 1  # the second poll did not read the database

    write_step(settings, job_id, 1, 0.25)
    job = wait_for(
        lambda: (j := api.get(f"/v1/jobs/{job_id}").json())["step"] == 1 and j,
        timeout=5,
        what="the new step to show",
        interval=0.001,
    )
    assert job["latest_metrics"] == {"reward": 0.25}
    assert {k: v for k, v in job.items() if k not in ("step", "latest_metrics")} == {
        k: v for k, v in first.items() if k not in ("step", "latest_metrics")
    }

    # The metrics poll: kept, then a replayed step (an UPDATE of its row) is heard too.
    assert [row["metrics"] for row in api.get(f"/v1/jobs/{job_id}/metrics").json()["data"]] == [
        {"reward": 0.25}
    ]
    hits = cache.hits
    api.get(f"/v1/jobs/{job_id}/metrics")
    assert cache.hits == hits + 1
    write_step(settings, job_id, 1, 0.75)
    wait_for(
        lambda: api.get(f"/v1/jobs/{job_id}/metrics").json()["data"][0]["metrics"] == {"reward": 0.75},
        timeout=5,
        what="the replayed step to show",
        interval=0.001,
    )


def test_every_poll_after_the_change_is_fresh(api, settings, job_id) -> None:
    """Not 'fresh within a TTL': once the change has been seen, no later poll is stale."""
    api.get(f"/v1/jobs/{job_id}")
    for step in range(1, 6):
        write_step(settings, job_id, step, step / 10)
        wait_for(
            lambda step=step: api.get(f"/v1/jobs/{job_id}").json()["step"] == step,
            timeout=5,
            what=f"step {step}",
            interval=0.001,
        )
        assert [api.get(f"/v1/jobs/{job_id}").json()["step"] for _ in range(20)] == [step] * 20


def test_a_write_through_this_process_is_seen_by_its_next_poll_at_once(api, settings, job_id) -> None:
    api.get(f"/v1/jobs/{job_id}")
    with transaction(settings.database_url) as session:  # a worker claims it: running
        session.execute(update(Job).where(Job.id == job_id).values(status="running", worker="w"))
    wait_for(
        lambda: api.get(f"/v1/jobs/{job_id}").json()["status"] == "running",
        timeout=5,
        what="running",
        interval=0.001,
    )
    # Notifications now go elsewhere: only the cancel route's own eviction can make the next poll fresh.
    listener = api.app.state.change_listener
    listener.cache = ResponseCache(max_bytes=1)
    try:
        assert api.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True
        assert api.get(f"/v1/jobs/{job_id}").json()["cancel_requested"] is True
    finally:
        listener.cache = cache_of(api)


def test_another_owner_is_not_answered_from_the_cache(api, settings, job_id) -> None:
    assert api.get(f"/v1/jobs/{job_id}").status_code == 200
    api.get(f"/v1/jobs/{job_id}/metrics")
    other = bearer(api_key(settings, owner="mallory"))
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/metrics"):
        answer = api.get(path, headers=other)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "job_not_found"


def test_an_answer_read_across_a_change_of_its_job_is_not_kept(monkeypatch) -> None:
    cache = ResponseCache(max_bytes=1 << 20)
    job = ("alice", "job")
    assert cache.ticket() is None  # not serving: nothing kept
    cache.put(cache.ticket(), "job_a", job, b"{}")
    cache.set_serving(True)
    assert cache.get("job_a", job) is None

    ticket = cache.ticket()  # a request starts reading job_a...
    cache.forget("job_a")  # ...job_a changes meanwhile (the read may predate it)...
    cache.put(ticket, "job_a", job, b'{"old": true}')
    assert cache.get("job_a", job) is None  # ...so its answer is not kept
    ticket = cache.ticket()
    cache.forget("job_b")  # another job's change does not matter
    cache.put(ticket, "job_a", job, b"{}")
    assert cache.get("job_a", job) == b"{}"

    monkeypatch.setattr("api.cache.MAX_TRACKED", 2)
    ticket = cache.ticket()
    for other in ("job_c", "job_d", "job_e"):  # job_b's change is forgotten: it counts as "just now"
        cache.forget(other)
    cache.put(ticket, "job_b", job, b"{}")
    assert cache.get("job_b", job) is None

    cache.set_serving(False)  # the listener is gone: nothing served, everything dropped
    assert cache.get("job_a", job) is None
    cache.set_serving(True)
    assert cache.get("job_a", job) is None


def test_polls_arriving_together_share_one_read() -> None:
    async def scenario() -> None:
        cache = ResponseCache(max_bytes=1 << 20)
        cache.set_serving(True)
        reads: list[int] = []

        def read() -> bytes:
            reads.append(1)
            number = len(reads)
            time.sleep(0.05)
            return f'{{"read": {number}}}'.encode()

        answers = await asyncio.gather(*(cache.answer("job_a", ("alice", "job"), read) for _ in range(20)))
        assert len(reads) == 1 and {a.body for a in answers} == {b'{"read": 1}'}
        # A change heard during a read: later arrivals read anew, those already waiting keep theirs.
        cache.forget("job_a")
        first = asyncio.ensure_future(cache.answer("job_a", ("alice", "job"), read))
        await asyncio.sleep(0.01)
        cache.forget("job_a")
        second = await cache.answer("job_a", ("alice", "job"), read)
        assert ((await first).body, second.body) == (b'{"read": 2}', b'{"read": 3}')
        assert cache.get("job_a", ("alice", "job")) == b'{"read": 3}'  # the read that began after the change

    asyncio.run(scenario())


def test_the_cache_keeps_within_its_size() -> None:
    cache = ResponseCache(max_bytes=1000)
    cache.set_serving(True)
    for n in range(20):
        cache.put(cache.ticket(), f"job_{n}", ("alice", "job"), b"x" * 100)
    assert sum(len(b) for variants in cache.answers.values() for b in variants.values()) <= 1000
    assert cache.get("job_19", ("alice", "job")) is not None and cache.get("job_0", ("alice", "job")) is None
    cache.put(cache.ticket(), "job_big", ("alice", "job"), b"x" * 2000)  # larger than it all: not kept
    assert cache.get("job_big", ("alice", "job")) is None


def test_a_lost_listener_stops_the_serving_and_its_return_drops_what_it_missed(api, settings, job_id) -> None:
    cache = cache_of(api)
    listener = api.app.state.change_listener
    assert api.get(f"/v1/jobs/{job_id}").json()["step"] == 0
    pid = listener.connection.info.backend_pid
    with psycopg.connect(listener.conninfo, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    # A write while no one listens: its notification is lost for good.
    write_step(settings, job_id, 1, 0.5)
    wait_for(
        lambda: cache.serving and listener.connection.info.backend_pid != pid,
        timeout=10,
        what="the listener to reconnect",
        interval=0.01,
    )
    assert api.get(f"/v1/jobs/{job_id}").json()["step"] == 1  # nothing from before the loss survived
    write_step(settings, job_id, 2, 0.5)  # and the new connection hears changes
    wait_for(
        lambda: api.get(f"/v1/jobs/{job_id}").json()["step"] == 2, timeout=5, what="step 2", interval=0.001
    )


def test_without_notifications_nothing_is_kept(settings, sent, tmp_path) -> None:
    """SQLite (the embedded default) cannot notify, and GRPO_RESPONSE_CACHE_MB=0 turns it off."""
    for app in (
        create_app(
            settings.model_copy(update={"database_url": f"sqlite:///{tmp_path}/grpo.db"}), send=sent.append
        ),
        create_app(settings.model_copy(update={"response_cache_mb": 0}), send=sent.append),
    ):
        assert app.state.change_listener is None
        assert not app.state.response_cache.serving
