"""Claims, heartbeats and the sweeper, on PostgreSQL and on SQLite: one holder per job, dead
workers' jobs come back, lost messages are re-sent."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from jobs.broker import Dispatcher
from jobs.db import session_factory, transaction
from jobs.migrate import upgrade
from jobs.models import Job, JobMetrics, JobStatus, utcnow
from jobs.queries import (
    append_metrics,
    claim_job,
    create_dataset,
    create_job,
    get_job,
    list_events,
    mark_sent,
    record_given_up,
    record_step,
    renew_lease,
    request_cancel,
)
from jobs.settings import Settings
from tests.service.factories import job_spec, stored_job_spec
from worker.sweeper import sweep

OWNER = "alice"


@pytest.fixture(params=["postgresql", "sqlite"])
def settings(request: pytest.FixtureRequest, api_database: str, tmp_path) -> Settings:
    """The API tests' PostgreSQL database, or a migrated SQLite file."""
    if request.param == "postgresql":
        return Settings(data_dir=tmp_path, database_url=api_database)
    url = f"sqlite:///{tmp_path / 'grpo.db'}"
    upgrade(url)
    return Settings(data_dir=tmp_path, database_url=url)


@pytest.fixture
def job_id(settings) -> str:
    """A queued job, sent to the broker just now (as the API leaves it)."""
    with transaction(settings.database_url) as session:
        dataset = create_dataset(
            session=session, owner=OWNER, name="d", rows=1, bytes=1, sha256="0" * 64, fields=["prompt"]
        )
        job = create_job(session=session, owner=OWNER, spec=stored_job_spec(job_spec(dataset.id)))
        mark_sent(session=session, job_id=job.id)
        return job.id


@pytest.fixture
def resent(settings) -> tuple[Dispatcher, list[str]]:
    sent: list[str] = []
    return Dispatcher(sent.append, session_factory(settings.database_url)), sent


def age(settings, job_id: str, **seconds_ago: float) -> None:
    """Move the job's timestamps into the past."""
    values = {column: utcnow() - timedelta(seconds=s) for column, s in seconds_ago.items()}
    with transaction(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def test_only_one_worker_can_claim_a_job(settings, job_id) -> None:
    with transaction(settings.database_url) as session:
        assert claim_job(session=session, job_id=job_id, worker="a") is not None
    with transaction(settings.database_url) as session:
        assert claim_job(session=session, job_id=job_id, worker="b") is None
        job = get_job(session=session, owner=OWNER, job_id=job_id)
        assert (job.status, job.worker, job.attempts) == ("running", "a", 1)
        assert renew_lease(session=session, job_id=job_id, worker="a")
        assert not renew_lease(session=session, job_id=job_id, worker="b")


def test_a_replayed_step_overwrites_its_metrics(settings, job_id) -> None:
    with transaction(settings.database_url) as session:
        append_metrics(session=session, job_id=job_id, step=1, metrics={"reward": 0.1})
    with transaction(settings.database_url) as session:
        append_metrics(session=session, job_id=job_id, step=1, metrics={"reward": 0.7})
    with transaction(settings.database_url) as session:
        rows = session.query(JobMetrics).filter_by(job_id=job_id).all()
        assert [(r.step, r.metrics) for r in rows] == [(1, {"reward": 0.7})]


def test_sweeper_requeues_a_job_whose_heartbeat_went_stale(settings, job_id, resent) -> None:
    dispatcher, sent = resent
    with transaction(settings.database_url) as session:
        claim_job(session=session, job_id=job_id, worker="dead")
    assert sweep(settings=settings, dispatcher=dispatcher) == []  # fresh heartbeat: left alone
    age(settings, job_id, heartbeat_at=settings.heartbeat_stale_s + 1)
    assert sweep(settings=settings, dispatcher=dispatcher) == [job_id]
    with transaction(settings.database_url) as session:
        job = get_job(session=session, owner=OWNER, job_id=job_id)
        assert (job.status, job.worker, job.attempts) == ("queued", None, 1)
        assert job.sent_at is not None
        # the old holder finds out at its next heartbeat or step, and writes nothing more
        assert not renew_lease(session=session, job_id=job_id, worker="dead")
        assert not record_step(session=session, job_id=job_id, worker="dead", step=5)
        assert claim_job(session=session, job_id=job_id, worker="new").attempts == 2
    assert sent == [job_id]


def test_sweeper_fails_a_job_that_keeps_losing_its_worker(settings, job_id, resent) -> None:
    dispatcher, sent = resent
    for attempt in range(settings.max_attempts):
        with transaction(settings.database_url) as session:
            assert claim_job(session=session, job_id=job_id, worker=f"w{attempt}") is not None
        age(settings, job_id, heartbeat_at=settings.heartbeat_stale_s + 1)
        sweep(settings=settings, dispatcher=dispatcher)
    with transaction(settings.database_url) as session:
        job = get_job(session=session, owner=OWNER, job_id=job_id)
        assert job.status == JobStatus.failed and "lost 3 times" in job.failure_reason
    assert len(sent) == settings.max_attempts - 1


def test_a_job_whose_attempts_gave_up_fails_naming_why(settings, job_id, resent) -> None:
    """An attempt that gave the job up for a cause it knew (the artifact store out of reach) says
    so on the record at once, and the failure after the last attempt names it, not a lost worker."""
    dispatcher, _ = resent
    cause = "the artifact store was out of reach (EndpointConnectionError)"
    for attempt in range(settings.max_attempts):
        worker = f"w{attempt}"
        with transaction(settings.database_url) as session:
            assert claim_job(session=session, job_id=job_id, worker=worker) is not None
        with transaction(settings.database_url) as session:
            assert record_given_up(session=session, job_id=job_id, worker=worker, cause=cause)
            assert not record_given_up(session=session, job_id=job_id, worker="another", cause="x")
        age(settings, job_id, heartbeat_at=settings.heartbeat_stale_s + 1)
        sweep(settings=settings, dispatcher=dispatcher)
    with transaction(settings.database_url) as session:
        job = get_job(session=session, owner=OWNER, job_id=job_id)
        assert job.status == JobStatus.failed
        assert job.failure_reason.endswith(f"the last gave up because {cause}"), job.failure_reason
        events, _ = list_events(session=session, job_id=job_id)
        given_up = [e for e in events if e.data and "given_up" in e.data]
        assert len(given_up) == settings.max_attempts and given_up[0].level == "warning"
        assert given_up[0].message.startswith(f"this attempt gave up: {cause}")


def test_sweeper_ends_a_dead_job_that_was_being_cancelled(settings, job_id, resent) -> None:
    dispatcher, sent = resent
    with transaction(settings.database_url) as session:
        claim_job(session=session, job_id=job_id, worker="dead")
        request_cancel(session=session, owner=OWNER, job_id=job_id)
    age(settings, job_id, heartbeat_at=settings.heartbeat_stale_s + 1)
    assert sweep(settings=settings, dispatcher=dispatcher) == []
    with transaction(settings.database_url) as session:
        assert get_job(session=session, owner=OWNER, job_id=job_id).status == JobStatus.cancelled


def test_sweeper_resends_queued_jobs_whose_message_may_be_lost(settings, job_id, resent) -> None:
    dispatcher, sent = resent
    assert sweep(settings=settings, dispatcher=dispatcher) == []  # sent just now by the API
    age(settings, job_id, sent_at=settings.resend_after_s + 1)
    assert sweep(settings=settings, dispatcher=dispatcher) == [job_id]
    assert sweep(settings=settings, dispatcher=dispatcher) == []  # and not again at once


def test_sweeper_sends_a_job_whose_send_after_commit_failed(settings, job_id, resent) -> None:
    dispatcher, sent = resent
    with transaction(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(sent_at=None))
    assert sweep(settings=settings, dispatcher=dispatcher) == []  # within the grace period
    age(settings, job_id, queued_at=settings.send_grace_s + 1)
    assert sweep(settings=settings, dispatcher=dispatcher) == [job_id] == sent


def test_sweeper_pauses_a_dead_job_that_was_being_paused(settings, job_id, resent) -> None:
    dispatcher, sent = resent
    with transaction(settings.database_url) as session:
        claim_job(session=session, job_id=job_id, worker="dead")
        session.execute(update(Job).where(Job.id == job_id).values(pause_requested=True))
    age(settings, job_id, heartbeat_at=settings.heartbeat_stale_s + 1)
    assert sweep(settings=settings, dispatcher=dispatcher) == []  # not re-queued: it waits to be resumed
    with transaction(settings.database_url) as session:
        job = get_job(session=session, owner=OWNER, job_id=job_id)
        assert (job.status, job.worker, job.pause_requested) == (JobStatus.paused, None, False)


def test_a_worker_with_a_free_slot_resends_queued_jobs_a_busy_one_waits(settings, job_id, resent) -> None:
    # A worker that has had a slot free for send_grace_s would be holding a queued job's message,
    # had the broker kept it (Redis restarted without persistence): it re-sends them all.
    dispatcher, sent = resent
    age(settings, job_id, sent_at=settings.send_grace_s + 1)
    assert sweep(settings=settings, dispatcher=dispatcher, idle_for_s=settings.send_grace_s - 1) == []
    assert (
        sweep(settings=settings, dispatcher=dispatcher, idle_for_s=settings.send_grace_s) == [job_id] == sent
    )
    assert (
        sweep(settings=settings, dispatcher=dispatcher, idle_for_s=settings.send_grace_s) == []
    )  # just sent
