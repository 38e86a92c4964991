"""End to end on the production setup: the API, PostgreSQL, Redis and a real Celery worker process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.service.e2e import download_and_load, metric_steps, status_changes, wait_for_step, wait_until_ended
from tests.service.factories import api_key, bearer, job_spec, upload

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(redis_worker_settings, redis_worker) -> Iterator[TestClient]:
    with TestClient(
        create_app(redis_worker_settings), headers=bearer(api_key(redis_worker_settings))
    ) as test_client:
        # sends to Redis for real
        yield test_client


@pytest.fixture(scope="module")
def dataset_id(client) -> str:
    return upload(client).json()["id"]


def test_a_job_runs_to_success_and_its_checkpoint_loads(
    client, redis_worker, dataset_id, tiny_model, tmp_path
) -> None:
    created = client.post(
        "/v1/jobs", json=job_spec(dataset_id, str(tiny_model), hyperparameters={"max_steps": 4})
    )
    assert created.status_code == 201 and created.json()["status"] == "queued"
    job_id = created.json()["id"]

    job = wait_until_ended(client, job_id)
    assert job["status"] == "succeeded", (job, redis_worker.log()[-3000:])
    assert (job["step"], job["attempts"], job["failure_reason"]) == (4, 1, None)
    assert status_changes(client, job_id) == ["queued", "running", "succeeded"]
    assert metric_steps(client, job_id) == [1, 2, 3, 4]
    assert {"reward", "kl", "loss"} <= set(job["latest_metrics"])
    checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step"] for c in checkpoints] == [2, 4] and checkpoints[-1]["kind"] == "model"
    download_and_load(client, job_id, 4, tmp_path)


def test_cancelling_a_running_job_stops_it_at_a_step_and_keeps_its_checkpoint(
    client, dataset_id, tiny_model
) -> None:
    spec = job_spec(dataset_id, str(tiny_model), hyperparameters={"max_steps": 500, "checkpoint_every": 0})
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    wait_for_step(client, job_id, 2)
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True

    job = wait_until_ended(client, job_id, timeout=60)
    assert job["status"] == "cancelled" and job["step"] < 500
    assert status_changes(client, job_id) == ["queued", "running", "cancelled"]
    assert metric_steps(client, job_id) == list(range(1, job["step"] + 1))
    checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step"] for c in checkpoints] == [job["step"]]


def test_a_model_that_cannot_load_fails_the_job_with_its_name(client, dataset_id) -> None:
    job_id = client.post("/v1/jobs", json=job_spec(dataset_id, "no-such-org/no-such-model")).json()["id"]
    job = wait_until_ended(client, job_id, timeout=60)
    assert job["status"] == "failed"
    assert "no-such-org/no-such-model" in job["failure_reason"]
    assert "Traceback" not in job["failure_reason"]
