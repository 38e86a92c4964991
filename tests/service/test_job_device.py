"""A one-device job trains on the device its claim recorded (``job.devices``), not on whatever the
trainer would pick: a worker whose GPU is counted but whose CUDA cannot start fails the job loudly
instead of training on the CPU while the record says ``cuda:0``. The job runs in this process
(``claim_and_run``, as the Celery task calls it) on PostgreSQL and a tiny model."""

from __future__ import annotations

import pytest

import worker.devices
from jobs.db import transaction
from jobs.queries import get_job
from tests.service.factories import job_spec, upload
from worker.devices import worker_devices
from worker.runner import claim_and_run

pytestmark = pytest.mark.slow


def run_job(client, settings, tiny_model, worker: str):
    dataset_id = upload(client).json()["id"]
    created = client.post(
        "/v1/jobs", json=job_spec(dataset_id, str(tiny_model), hyperparameters={"max_steps": 1})
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    claim_and_run(job_id, settings=settings, worker=worker)
    with transaction(settings.database_url) as session:
        job = get_job(session=session, owner="alice", job_id=job_id)
        return job.status, job.devices, job.failure_reason


def test_a_job_trains_on_the_device_its_claim_recorded(client, settings, tiny_model, monkeypatch) -> None:
    worker_devices.cache_clear()
    try:
        assert run_job(client, settings, tiny_model, "cpu-worker")[:2] == ("succeeded", ["cpu"])

        # What a machine whose driver counts a GPU that CUDA cannot start looks like to the worker
        # (this machine has no CUDA): the job named cuda:0 fails rather than training on the CPU.
        monkeypatch.setattr(worker.devices, "cuda_device_count", lambda: 1)
        worker_devices.cache_clear()
        status, devices, reason = run_job(client, settings, tiny_model, "broken-gpu-worker")
        assert (status, devices) == ("failed", ["cuda:0"]), reason
        # a reason the operator can act on, not "internal error in the worker"
        assert "declared cuda:0 but cannot use CUDA" in reason and "internal error" not in reason, reason
    finally:
        worker_devices.cache_clear()
