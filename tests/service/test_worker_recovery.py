"""A worker killed with SIGKILL mid-job: the sweeper re-queues the job, another worker resumes it
from its newest checkpoint, and every step's metrics are recorded exactly once."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.service.e2e import metric_steps, status_changes, wait_for_step, wait_until_ended
from tests.service.factories import WorkerProcess, job_spec, upload

pytestmark = pytest.mark.slow


def test_a_killed_worker_s_job_resumes_on_another_worker(redis_worker_settings, tiny_model) -> None:
    settings = redis_worker_settings
    first = WorkerProcess(settings).start()
    second = WorkerProcess(settings)
    try:
        with TestClient(create_app(settings)) as client:
            dataset_id = upload(client).json()["id"]
            spec = job_spec(dataset_id, str(tiny_model), hyperparameters={"max_steps": 30, "checkpoint_every": 2})
            job_id = client.post("/v1/jobs", json=spec).json()["id"]
            wait_for_step(client, job_id, 3)  # a checkpoint exists (step 2), and training goes on
            first.kill()
            killed_at = client.get(f"/v1/jobs/{job_id}").json()
            assert killed_at["status"] == "running"

            second.start()
            job = wait_until_ended(client, job_id)
            assert job["status"] == "succeeded", (job, second.log()[-3000:])
            assert (job["step"], job["attempts"]) == (30, 2)
            assert status_changes(client, job_id) == ["queued", "running", "queued", "running", "succeeded"]
            assert metric_steps(client, job_id) == list(range(1, 31))  # once each: replays overwrote
            events = [e["message"] for e in client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]]
            assert any(m.startswith("resuming after step ") and int(m.split()[3]) >= 2 for m in events), events
            assert any(first.name in m and "stopped sending heartbeats" in m for m in events), events
    finally:
        first.stop()
        second.stop()
        first.forget_broker_keys()
