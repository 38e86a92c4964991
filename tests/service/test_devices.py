"""Devices: a job's ``gpus``, the workers' registry that decides what the API accepts, the queue
of each size, a claim that records the devices given, and the sweeper's re-sends by size."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis
from sqlalchemy import select, update

from jobs.broker import Dispatcher, job_sender, make_celery, train_queue, train_queues
from jobs.db import session_factory, transaction
from jobs.migrate import upgrade
from jobs.models import Job, Worker, since, utcnow
from jobs.queries import (
    claim_job,
    create_dataset,
    create_job,
    forget_workers,
    get_job,
    largest_live_worker,
    mark_sent,
    record_worker,
)
from jobs.settings import Settings
from tests.service.conftest import REDIS_URL
from tests.service.factories import RUN_ID, forget_broker_keys, job_spec, stored_job_spec, upload
from worker.devices import DeviceError, name_devices
from worker.sweeper import sweep

OWNER = "alice"


def register(settings: Settings, name: str, devices: int, *, seconds_ago: float = 0.0) -> None:
    """A worker row, as ``worker.presence`` writes it, last renewed ``seconds_ago``."""
    with transaction(settings.database_url) as session:
        record_worker(session=session, name=name, devices=devices)
        session.execute(
            update(Worker)
            .where(Worker.name == name)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds_ago))
        )


def test_a_worker_has_the_devices_it_declares_or_finds() -> None:
    assert name_devices(None, cuda=0) == ("cpu",)  # no CUDA: one process
    assert name_devices(3, cuda=0) == ("cpu", "cpu", "cpu")  # no CUDA: a device is a process
    assert name_devices(None, cuda=2) == ("cuda:0", "cuda:1")  # every GPU it sees
    assert name_devices(1, cuda=2) == ("cuda:0",)
    with pytest.raises(DeviceError, match="GRPO_WORKER_DEVICES is 3, but this worker sees 2 CUDA devices"):
        name_devices(3, cuda=2)


def test_each_size_has_its_queue_and_a_worker_consumes_those_it_fits() -> None:
    settings = Settings(queue="gpu")
    assert train_queue(settings, 1) == "gpu"  # the queue one-device workers have always consumed
    assert train_queue(settings, 4) == "gpu.gpus-4"
    assert train_queues(settings, 1) == ["gpu"]
    assert train_queues(settings, 3) == ["gpu.gpus-3", "gpu.gpus-2", "gpu"]


# The API, on PostgreSQL (``client`` and ``settings`` of conftest; ``sent`` what it handed the broker).


FOUR_PROMPTS = {"prompts_per_step": 4}  # a prompt a step for each of 4 processes at least


@pytest.fixture
def dataset_id(client) -> str:
    return upload(client).json()["id"]


def test_a_job_asks_for_one_device_unless_it_says_and_shows_what_it_asked(
    client, settings, sent, dataset_id
) -> None:
    job = client.post("/v1/jobs", json=job_spec(dataset_id)).json()
    assert (job["gpus"], job["devices"]) == (1, None)
    with transaction(settings.database_url) as session:
        stored = session.get(Job, job["id"])
        assert (stored.spec["gpus"], stored.gpus) == (1, 1)  # in the stored spec, beside base_model

    register(settings, "big", 2)
    two = client.post("/v1/jobs", json=job_spec(dataset_id, gpus=2)).json()
    assert two["gpus"] == 2 and client.get(f"/v1/jobs/{two['id']}").json()["gpus"] == 2
    assert sent == [job["id"], two["id"]]
    refused = client.post("/v1/jobs", json=job_spec(dataset_id, gpus=0))
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "gpus"
    for not_a_count in ("2", True, 2.0):  # strict, as group_size
        refused = client.post("/v1/jobs", json=job_spec(dataset_id, gpus=not_a_count))
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "gpus", not_a_count
    # fewer prompts a step than processes: one would have nothing to generate or train
    idle = client.post("/v1/jobs", json=job_spec(dataset_id, gpus=2, hyperparameters={"prompts_per_step": 1}))
    assert idle.status_code == 422, idle.text
    assert idle.json()["error"]["param"] == "hyperparameters.prompts_per_step"
    assert "prompts_per_step is 1, fewer than gpus (2)" in idle.json()["error"]["message"]
    assert sent == [job["id"], two["id"]]


def test_a_job_asking_for_more_devices_than_any_live_worker_is_refused_naming_the_largest(
    client, settings, sent, dataset_id
) -> None:
    register(settings, "small", 1)
    register(settings, "pair", 2)
    register(settings, "gone", 8, seconds_ago=settings.heartbeat_stale_s + 1)  # stopped: not counted
    for dry_run in (False, True):
        response = client.post("/v1/jobs", params={"dry_run": dry_run}, json=job_spec(dataset_id, gpus=4))
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("limit_exceeded", "gpus")
        assert "the largest worker here has 2 devices" in error["message"]
    assert sent == [] and client.get("/v1/jobs").json()["data"] == []

    register(settings, "gone", 8)  # back: its size is available again
    assert (
        client.post("/v1/jobs", json=job_spec(dataset_id, gpus=4, hyperparameters=FOUR_PROMPTS)).status_code
        == 201
    )


def test_with_no_live_worker_a_job_of_any_size_waits_in_its_queue(client, settings, dataset_id) -> None:
    register(settings, "gone", 1, seconds_ago=settings.heartbeat_stale_s + 1)
    job = client.post("/v1/jobs", json=job_spec(dataset_id, gpus=4, hyperparameters=FOUR_PROMPTS))
    assert job.status_code == 201 and job.json()["status"] == "queued"


# The record and the sweeper, on PostgreSQL and on SQLite.


@pytest.fixture(params=["postgresql", "sqlite"])
def record(request: pytest.FixtureRequest, api_database: str, tmp_path) -> Settings:
    if request.param == "postgresql":
        return Settings(data_dir=tmp_path, database_url=api_database)
    url = f"sqlite:///{tmp_path / 'grpo.db'}"
    upgrade(url)
    return Settings(data_dir=tmp_path, database_url=url)


def queued_job(settings: Settings, gpus: int) -> str:
    """A queued job asking for ``gpus`` devices, sent to the broker just now (as the API leaves it)."""
    with transaction(settings.database_url) as session:
        dataset = create_dataset(
            session=session, owner=OWNER, name="d", rows=1, bytes=1, sha256="0" * 64, fields=["prompt"]
        )
        job = create_job(session=session, owner=OWNER, spec=stored_job_spec(job_spec(dataset.id, gpus=gpus)))
        mark_sent(session=session, job_id=job.id)
        return job.id


def test_the_largest_live_worker_is_what_live_workers_last_said(record) -> None:
    def largest() -> int | None:
        with transaction(record.database_url) as session:
            return largest_live_worker(session=session, seen_after=since(record.heartbeat_stale_s))

    assert largest() is None
    register(record, "a", 4)
    register(record, "a", 1)  # restarted with fewer: its row says so, not a second one
    register(record, "b", 2, seconds_ago=record.heartbeat_stale_s + 1)
    assert largest() == 1
    register(record, "b", 2)
    assert largest() == 2
    register(record, "b", 2, seconds_ago=2 * 24 * 3600)
    with transaction(record.database_url) as session:
        assert forget_workers(session=session, seen_before=since(24 * 3600)) == 1
        assert session.scalars(select(Worker.name)).all() == ["a"]


def test_a_claim_gives_the_job_as_many_of_the_workers_devices_as_it_asks(record) -> None:
    job_id = queued_job(record, gpus=2)
    with transaction(record.database_url) as session:
        assert claim_job(session=session, job_id=job_id, worker="small", devices=("cuda:0",)) is None
        assert get_job(session=session, owner=OWNER, job_id=job_id).status == "queued"  # left for another
    with transaction(record.database_url) as session:
        devices = ("cuda:0", "cuda:1", "cuda:2")
        job = claim_job(session=session, job_id=job_id, worker="big", devices=devices)
        assert job is not None and (job.status, job.worker, job.devices) == (
            "running",
            "big",
            ["cuda:0", "cuda:1"],
        )
    with transaction(record.database_url) as session:
        assert get_job(session=session, owner=OWNER, job_id=job_id).devices == ["cuda:0", "cuda:1"]


def test_an_idle_worker_resends_only_the_jobs_it_fits_and_the_backstop_resends_any(record) -> None:
    """An idle worker would hold a message of the queues it consumes, had the broker kept it; it
    says nothing of a bigger size's queue, whose job (no worker may fit it) is not re-sent every
    few seconds."""
    one, two = queued_job(record, gpus=1), queued_job(record, gpus=2)
    with transaction(record.database_url) as session:
        session.execute(update(Job).values(sent_at=utcnow() - timedelta(seconds=record.send_grace_s + 1)))
    sent: list[str] = []
    dispatcher = Dispatcher(sent.append, session_factory(record.database_url))
    idle = record.send_grace_s
    assert sweep(settings=record, dispatcher=dispatcher, idle_for_s=idle, devices=1) == [one]
    with transaction(record.database_url) as session:
        session.execute(update(Job).values(sent_at=utcnow() - timedelta(seconds=record.send_grace_s + 1)))
    assert sweep(settings=record, dispatcher=dispatcher, idle_for_s=idle, devices=2) == [one, two]
    with transaction(record.database_url) as session:
        session.execute(update(Job).values(sent_at=utcnow() - timedelta(seconds=record.resend_after_s + 1)))
    assert sweep(settings=record, dispatcher=dispatcher, devices=1) == [one, two]  # busy: the backstop
    assert sent == [one, one, two, one, two]


def test_the_sweeper_sends_a_requeued_job_to_the_queue_of_its_size(api_database, tmp_path) -> None:
    """The real sender on Redis: a job whose worker died goes back to the queue of its size,
    read from its row, where only a worker big enough listens."""
    settings = Settings(
        data_dir=tmp_path,
        database_url=api_database,
        broker_url=REDIS_URL,
        broker_key_prefix=f"grpo-test-{RUN_ID}-devices:",
        queue=f"gpu-{RUN_ID}",
    )
    job_id = queued_job(settings, gpus=2)
    with transaction(settings.database_url) as session:
        claim_job(session=session, job_id=job_id, worker="dead", devices=("cpu", "cpu"))
        session.execute(
            update(Job).values(heartbeat_at=utcnow() - timedelta(seconds=settings.heartbeat_stale_s + 1))
        )
    sessions = session_factory(settings.database_url)
    dispatcher = Dispatcher(job_sender(make_celery(settings), settings, sessions), sessions)
    try:
        assert sweep(settings=settings, dispatcher=dispatcher, devices=1) == [job_id]
        broker = redis.Redis.from_url(REDIS_URL)
        prefix = settings.broker_key_prefix
        assert broker.llen(f"{prefix}{train_queue(settings, 2)}") == 1
        assert broker.llen(f"{prefix}{train_queue(settings, 1)}") == 0
    finally:
        forget_broker_keys(settings)
