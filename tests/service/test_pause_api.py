"""POST /v1/jobs/{id}/pause and /resume on PostgreSQL (the broker is a list, the worker a few
conditional updates): what each state allows, and what is sent when."""

from __future__ import annotations

import pytest

from jobs.db import transaction
from jobs.models import JobStatus
from jobs.queries import claim_job, finish_job, stop_job
from tests.service.e2e import status_changes
from tests.service.factories import job_spec, upload


@pytest.fixture
def job_id(client) -> str:
    return client.post("/v1/jobs", json=job_spec(upload(client).json()["id"])).json()["id"]


def claim(settings, job_id: str, worker: str = "w") -> None:
    with transaction(settings.database_url) as session:
        assert claim_job(session=session, job_id=job_id, worker=worker) is not None


def test_a_queued_job_pauses_at_once_and_resuming_sends_it_again(client, sent, job_id) -> None:
    paused = client.post(f"/v1/jobs/{job_id}/pause").json()
    assert (paused["status"], paused["pause_requested"]) == ("paused", False)
    assert client.post(f"/v1/jobs/{job_id}/pause").json()["status"] == "paused"  # again: no change
    assert sent == [job_id]  # only the creation's message: a paused job is not sent

    resumed = client.post(f"/v1/jobs/{job_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    assert sent == [job_id, job_id]  # re-sent after the commit
    assert status_changes(client, job_id) == ["queued", "paused", "queued"]


def test_a_running_job_is_asked_to_pause_and_its_worker_marks_it_paused(
    client, settings, sent, job_id
) -> None:
    claim(settings, job_id)
    asked = client.post(f"/v1/jobs/{job_id}/pause").json()
    assert (asked["status"], asked["pause_requested"]) == ("running", True)
    response = client.post(f"/v1/jobs/{job_id}/resume")
    assert response.status_code == 409 and "still pausing" in response.json()["error"]["message"]

    with transaction(settings.database_url) as session:  # the worker, at its next step boundary
        assert stop_job(session=session, job_id=job_id, worker="w", step=3) == JobStatus.paused
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["pause_requested"], job["worker"], job["step"]) == ("paused", False, None, 0)
    assert client.post(f"/v1/jobs/{job_id}/resume").json()["status"] == "queued"
    claim(settings, job_id, "w2")
    assert client.get(f"/v1/jobs/{job_id}").json()["attempts"] == 1  # counted afresh after a resume


def test_a_cancel_wins_over_a_pause(client, settings, job_id) -> None:
    claim(settings, job_id)
    client.post(f"/v1/jobs/{job_id}/pause")
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True
    response = client.post(f"/v1/jobs/{job_id}/pause")
    assert response.status_code == 409 and "being cancelled" in response.json()["error"]["message"]
    with transaction(settings.database_url) as session:
        assert stop_job(session=session, job_id=job_id, worker="w", step=2) == JobStatus.cancelled
        assert stop_job(session=session, job_id=job_id, worker="w", step=2) is None  # no longer held


def test_a_paused_job_can_be_cancelled(client, job_id) -> None:
    client.post(f"/v1/jobs/{job_id}/pause")
    job = client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert job["status"] == "cancelled" and job["finished_at"] is not None
    assert client.get(f"/v1/jobs/{job_id}/events").json()["data"][-1]["message"] == "cancelled while paused"


@pytest.mark.parametrize("ended", [JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled])
def test_an_ended_job_can_be_neither_paused_nor_resumed(client, settings, job_id, ended) -> None:
    if ended == JobStatus.cancelled:
        client.post(f"/v1/jobs/{job_id}/cancel")
    else:
        claim(settings, job_id)
        with transaction(settings.database_url) as session:
            finish_job(session=session, job_id=job_id, worker="w", status=ended)
    for action, says in (
        ("pause", f"already ended {ended.value}"),
        ("resume", "only a paused job can be resumed"),
    ):
        response = client.post(f"/v1/jobs/{job_id}/{action}")
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["code"] == "job_state_conflict" and says in error["message"]


def test_only_a_paused_job_can_be_resumed(client, settings, job_id) -> None:
    response = client.post(f"/v1/jobs/{job_id}/resume")
    assert (
        response.status_code == 409 and "is queued; only a paused job" in response.json()["error"]["message"]
    )
    claim(settings, job_id)
    response = client.post(f"/v1/jobs/{job_id}/resume")
    assert response.status_code == 409 and "is running" in response.json()["error"]["message"]


def test_pause_and_resume_of_an_unknown_job_are_404(client) -> None:
    for action in ("pause", "resume"):
        response = client.post(f"/v1/jobs/job_nope/{action}")
        assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
