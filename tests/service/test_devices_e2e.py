"""Scheduling by devices with real Celery workers on Redis: a worker takes only the jobs that fit
its declared devices, a bigger job waits in its own queue for a worker that fits, the API refuses
what no live worker can run, and each job records the devices it ran on (and runs on as many
processes, ``worker.rank``)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from jobs.db import transaction
from jobs.models import since
from jobs.queries import largest_live_worker, record_worker
from tests.service.e2e import download_and_load, metric_steps, wait_until_ended
from tests.service.factories import WorkerProcess, api_key, bearer, job_spec, upload, wait_for
from trainer.checkpoint import OPTIMIZER_DIR, OPTIMIZER_FILE
from trainer.layout import STATE_DIR, checkpoint_name

pytestmark = pytest.mark.slow


def largest_live(settings) -> int | None:
    with transaction(settings.database_url) as session:
        return largest_live_worker(session=session, seen_after=since(settings.heartbeat_stale_s))


def test_a_one_device_worker_leaves_a_two_device_job_queued_for_a_worker_that_fits(
    redis_worker_settings, tiny_model, tmp_path
) -> None:
    settings = redis_worker_settings
    small = WorkerProcess(settings.model_copy(update={"worker_devices": 1}))
    pair = WorkerProcess(settings.model_copy(update={"worker_devices": 2}))
    small.start()
    try:
        with TestClient(create_app(settings), headers=bearer(api_key(settings))) as client:
            dataset_id = upload(client).json()["id"]
            spec = job_spec(dataset_id, str(tiny_model), hyperparameters={"max_steps": 2})
            wait_for(lambda: largest_live(settings) == 1, timeout=60, what="the worker to register")

            refused = client.post("/v1/jobs", json={**spec, "gpus": 2})
            assert refused.status_code == 422 and refused.json()["error"]["param"] == "gpus"
            assert "the largest worker here has 1 device;" in refused.json()["error"]["message"]

            with transaction(settings.database_url) as session:  # a two-device worker, up for a moment
                record_worker(session=session, name="passing-by", devices=2)
            two = client.post("/v1/jobs", json={**spec, "gpus": 2}).json()
            one = client.post("/v1/jobs", json=spec).json()

            done = wait_until_ended(client, one["id"])
            assert done["status"] == "succeeded", (done, small.log()[-3000:])
            assert done["devices"] == ["cpu"] and done["worker"].startswith(small.name)
            waiting = client.get(f"/v1/jobs/{two['id']}").json()  # sent first, and never taken
            assert (waiting["status"], waiting["attempts"], waiting["devices"]) == ("queued", 0, None)

            pair.start()
            done = wait_until_ended(client, two["id"])
            assert done["status"] == "succeeded", (done, pair.log()[-3000:])
            assert done["devices"] == ["cpu", "cpu"] and done["worker"].startswith(pair.name)
            # It trained on two processes, as one: each step reported once (by rank 0), and the
            # optimizer state saved as two processes' shards (one process saves it whole).
            assert metric_steps(client, two["id"]) == [1, 2]
            state = settings.job_dir(two["id"]) / "checkpoints" / checkpoint_name(2) / STATE_DIR
            assert (state / OPTIMIZER_DIR).is_dir() and not (state / OPTIMIZER_FILE).exists()
            assert not list(settings.job_dir(two["id"]).glob(".rank*-outcome.json"))
            download_and_load(client, two["id"], 2, tmp_path)

            # A process's error reaches the job as in-process: the trainer's reason, not the launcher's.
            broken = {**spec, "gpus": 2, "base_model": "no-such-org/no-such-model"}
            failed = wait_until_ended(client, client.post("/v1/jobs", json=broken).json()["id"], timeout=60)
            assert (failed["status"], failed["devices"]) == ("failed", ["cpu", "cpu"]), failed
            assert "no-such-org/no-such-model" in failed["failure_reason"]
            assert "rank" not in failed["failure_reason"] and "Traceback" not in failed["failure_reason"]
    finally:
        for worker in (small, pair):
            worker.stop()
        small.forget_broker_keys()
