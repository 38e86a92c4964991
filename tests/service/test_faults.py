"""Broker, API and database faults, caused on purpose: a Redis of our own restarted with jobs
queued, the API killed under load, a worker's database connection cut. The database is the
truth: nothing accepted is lost, nothing runs twice. Plus a bounded load test on loopback."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.engine import make_url

from api.main import create_app
from jobs.db import transaction
from jobs.models import Job
from jobs.settings import Settings
from tests.service.e2e import metric_steps, status_changes, wait_for_step, wait_until_ended
from tests.service.factories import WorkerProcess, api_key, bearer, job_spec, upload, wait_for
from tests.service.faults import ApiProcess, RedisServer, TcpProxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def settings(make_database, redis_server, tmp_path_factory, model_dirs) -> Settings:
    """The module's own Redis and database; short leases, and a sweeper that acts on a message
    missing for 2 s (30 s in production). No cap on active jobs, no rate limit: the load is the point."""
    return Settings(
        data_dir=tmp_path_factory.mktemp("faults"),
        database_url=make_database(),
        broker_url=redis_server.url,
        heartbeat_interval_s=0.5,
        heartbeat_stale_s=10,
        sweep_interval_s=1,
        send_grace_s=2,
        max_active_jobs_per_owner=10_000,
        rate_limit_per_s=0,
        model_dirs=model_dirs,
    )


@pytest.fixture(scope="module")
def worker(settings) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(settings, concurrency=3).start()  # three tiny jobs at a time
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def key(settings) -> str:
    return api_key(settings)


@pytest.fixture(scope="module")
def client(settings, key, worker) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=bearer(key)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def tiny_spec(client, tiny_model) -> dict[str, Any]:
    """A job that runs in a second or two."""
    dataset_id = upload(client).json()["id"]
    return job_spec(dataset_id, str(tiny_model), hyperparameters={"max_steps": 1, "checkpoint_every": 0})


def jobs_in_database(settings: Settings) -> list[Job]:
    with transaction(settings.database_url) as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def test_twenty_jobs_queued_when_redis_restarts_all_run(
    client, settings, redis_server, worker, tiny_spec
) -> None:
    ids = [client.post("/v1/jobs", json=tiny_spec).json()["id"] for _ in range(20)]
    redis_server.stop()  # SHUTDOWN NOSAVE: every queued message, and the one being worked on, is gone
    queued = [job.id for job in jobs_in_database(settings) if job.status == "queued"]
    assert len(queued) >= 15, "the worker ran most jobs before Redis stopped: this test tested nothing"
    time.sleep(2)
    redis_server.start()  # empty, on the same port; the sweeper re-sends what the database says is queued

    jobs = [wait_until_ended(client, job_id, timeout=240) for job_id in ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * 20, worker.log()[-3000:]
    assert [job["attempts"] for job in jobs] == [1] * 20  # however often re-sent, each ran once
    assert all(status_changes(client, job_id) == ["queued", "running", "succeeded"] for job_id in ids)


def post_until_answered(http: httpx.Client, spec: dict[str, Any]) -> str:
    """Create a job as a careful client does: one Idempotency-Key, retried until the API answers.

    A retry can overtake the attempt it repeats: the client gave up waiting (its 10 s timeout, on
    a loaded machine) while the server went on. The retry then waits for that attempt's key and,
    once it commits, is told 409 "another request with this Idempotency-Key is being processed;
    retry it", and the next retry gets the job. Any other answer but 201 is a failure."""
    idempotency_key = uuid.uuid4().hex
    deadline = time.monotonic() + 180  # a restart on a loaded machine, and then a queue of retries
    while time.monotonic() < deadline:
        try:
            response = http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": idempotency_key})
        except httpx.TransportError:  # the API is down, or died mid-request, or is slower than our timeout
            time.sleep(0.1)
            continue
        if response.status_code >= 500 or (
            response.status_code == 409 and response.json()["error"]["code"] == "conflict"
        ):
            time.sleep(0.1)
            continue
        assert response.status_code == 201, response.text
        return response.json()["id"]
    raise AssertionError("the API did not come back")


def test_an_api_killed_under_load_loses_no_accepted_job(settings, key, worker, tiny_spec) -> None:
    before = {job.id for job in jobs_in_database(settings)}
    api = ApiProcess(settings).start()
    accepted: list[str] = []
    problems: list[str] = []
    requests = iter(range(12))  # twelve jobs to create, shared by the clients (next() holds the GIL)

    def client_loop() -> None:
        with httpx.Client(base_url=api.url, headers=bearer(key), timeout=10) as http:
            for _ in requests:
                try:
                    accepted.append(post_until_answered(http, tiny_spec))
                except Exception as exc:
                    problems.append(repr(exc))

    clients = [threading.Thread(target=client_loop) for _ in range(4)]
    try:
        for thread in clients:
            thread.start()
        wait_for(lambda: len(accepted) >= 3, timeout=120, what="the first jobs")
        api.kill()  # SIGKILL, requests in flight: some committed and unanswered, some not committed
        api.start(timeout=180)
        joined_by = time.monotonic() + 600  # each request gives up on its own after 180 s
        for thread in clients:
            thread.join(timeout=max(0.0, joined_by - time.monotonic()))
        assert not any(thread.is_alive() for thread in clients), "a client is still creating jobs"
    finally:
        api.stop()

    created = {job.id for job in jobs_in_database(settings)} - before
    assert problems == [] and len(accepted) == 12
    assert (
        len(accepted) == len(set(accepted)) == len(created) and set(accepted) == created
    )  # none lost, none twice
    with TestClient(create_app(settings), headers=bearer(key)) as client:
        for job_id in accepted:
            job = wait_until_ended(client, job_id, timeout=240)
            assert (job["status"], job["attempts"]) == ("succeeded", 1), (job, worker.log()[-3000:])


def test_a_worker_that_loses_its_database_for_a_while_retries_and_finishes_the_job(
    settings, make_database, key, tiny_model
) -> None:
    database_url = make_database()  # its own: the module's worker and its sweeper stay out of it
    database_port = make_url(database_url).port or 5432
    proxy = TcpProxy(database_port)
    direct = settings.model_copy(
        update={"database_url": database_url, "queue": f"db-{uuid.uuid4().hex[:6]}", "heartbeat_stale_s": 30}
    )
    through_proxy = direct.model_copy(
        update={
            "database_url": make_url(database_url).set(port=proxy.port).render_as_string(hide_password=False)
        }
    )
    worker = WorkerProcess(through_proxy).start()
    try:
        with TestClient(create_app(direct), headers=bearer(api_key(direct))) as client:
            dataset_id = upload(client).json()["id"]
            spec = job_spec(
                dataset_id, str(tiny_model), hyperparameters={"max_steps": 10, "checkpoint_every": 5}
            )
            job_id = client.post("/v1/jobs", json=spec).json()["id"]
            wait_for_step(client, job_id, 3)
            proxy.cut()  # every connection dropped, new ones refused
            time.sleep(4)
            cut_at = client.get(f"/v1/jobs/{job_id}").json()["step"]
            time.sleep(1)
            assert client.get(f"/v1/jobs/{job_id}").json()["step"] == cut_at  # it could not write
            proxy.restore()

            job = wait_until_ended(client, job_id)
            assert (job["status"], job["step"], job["attempts"]) == ("succeeded", 10, 1), (
                job,
                worker.log()[-3000:],
            )
            assert metric_steps(client, job_id) == list(range(1, 11))
            assert status_changes(client, job_id) == ["queued", "running", "succeeded"]  # never re-queued
        assert "database unreachable" in worker.log() and "retrying" in worker.log()
    finally:
        worker.stop()
        proxy.close()


def test_sixty_four_clients_creating_and_polling_jobs_see_no_error_and_no_lost_job(
    settings, make_database, tiny_model
) -> None:
    # No worker serves this database: the jobs stay queued, and what is measured is the API, the
    # database and the broker under concurrency, not the trainer on two CPU cores.
    idle = settings.model_copy(
        update={"database_url": make_database(), "queue": f"idle-{uuid.uuid4().hex[:6]}"}
    )
    key = api_key(idle)
    api = ApiProcess(idle).start()
    with httpx.Client(base_url=api.url, headers=bearer(key), timeout=30) as http:
        tiny_spec = job_spec(upload(http).json()["id"], str(tiny_model))
    created: list[str] = []
    problems: list[str] = []

    async def client(http: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                response = await http.post(
                    "/v1/jobs", json=tiny_spec, headers={"Idempotency-Key": uuid.uuid4().hex}
                )
                if response.status_code != 201:
                    problems.append(f"POST {response.status_code}: {response.text[:200]}")
                    continue
                job_id = response.json()["id"]
                created.append(job_id)
                for _ in range(2):
                    shown = await http.get(f"/v1/jobs/{job_id}")
                    if shown.status_code != 200 or shown.json()["id"] != job_id:
                        problems.append(f"GET {shown.status_code}: {shown.text[:200]}")
            except httpx.HTTPError as exc:
                problems.append(f"{exc.request.method} {exc.request.url.path}: {type(exc).__name__}: {exc}")

    async def load(seconds: float) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(
            base_url=api.url, headers=bearer(key), timeout=30, limits=limits
        ) as http:
            deadline = time.monotonic() + seconds
            await asyncio.gather(*(client(http, deadline) for _ in range(64)))

    try:
        asyncio.run(load(12))
        listed, after = [], None
        with httpx.Client(base_url=api.url, headers=bearer(key), timeout=30) as http:
            while True:
                page = http.get(
                    "/v1/jobs", params={"limit": 100, **({"after": after} if after else {})}
                ).json()
                listed += [job["id"] for job in page["data"]]
                if not page["has_more"]:
                    break
                after = page["data"][-1]["id"]
    finally:
        api.stop()
    assert problems == [], f"{problems}\n{api.log()[-4000:]}"
    assert len(created) >= 64, "fewer jobs than clients: the load did not happen"
    assert len(set(created)) == len(created)
    assert set(created) <= set(listed)  # every job a client was given is there, once
    assert len(listed) == len(set(listed))
    with transaction(idle.database_url) as session:
        stored = set(session.scalars(select(Job.id)))
    assert stored == set(created)  # and nothing else
