"""Scheduling by devices with real Celery workers on Redis: a worker takes only the jobs that fit
its declared devices, a bigger job waits in its own queue for a worker that fits, the API refuses
what no live worker can run, and each job records the devices it ran on (and runs on as many
processes, ``worker.rank``)."""

from __future__ import annotations

import signal

import psutil
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from jobs.db import transaction
from jobs.models import since
from jobs.queries import largest_live_worker, record_worker
from tests.service.e2e import download_and_load, metric_steps, wait_for_step, wait_until_ended
from tests.service.factories import WorkerProcess, api_key, bearer, job_spec, upload, wait_for
from trainer.checkpoint import OPTIMIZER_DIR, OPTIMIZER_FILE
from trainer.layout import STATE_DIR, checkpoint_name

pytestmark = pytest.mark.slow


def rank_processes(worker: WorkerProcess) -> dict[int, psutil.Process]:
    """The job processes (``python -m worker.rank``) under ``worker``, by their RANK."""
    assert worker.process is not None
    found = {}
    for process in psutil.Process(worker.process.pid).children(recursive=True):
        try:
            if "worker.rank" in process.cmdline() and process.status() != psutil.STATUS_ZOMBIE:
                found[int(process.environ()["RANK"])] = process
        except psutil.NoSuchProcess:  # ended meanwhile
            continue
    return found


def ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


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


def test_a_killed_rank_fails_the_job_naming_it_and_leaves_no_process_behind(
    redis_worker_settings, tiny_model
) -> None:
    """SIGKILL one process of a running gpus=2 job (as the kernel's out-of-memory killer would): the
    job ends failed, its reason naming that rank and the signal (not a hang, not the other rank's
    collective error), and neither process outlives it."""
    settings = redis_worker_settings
    pair = WorkerProcess(settings.model_copy(update={"worker_devices": 2}))
    pair.start()
    try:
        with TestClient(create_app(settings), headers=bearer(api_key(settings))) as client:
            dataset_id = upload(client).json()["id"]
            endless = {"max_steps": 10_000, "checkpoint_every": 0}
            spec = job_spec(dataset_id, str(tiny_model), gpus=2, hyperparameters=endless)
            wait_for(lambda: largest_live(settings) == 2, timeout=60, what="the worker to register")
            job_id = client.post("/v1/jobs", json=spec).json()["id"]

            wait_for_step(client, job_id, 1, timeout=300)  # both processes joined and trained a step
            ranks = rank_processes(pair)
            assert set(ranks) == {0, 1}, (ranks, pair.log()[-3000:])
            victim = ranks[1]
            victim.send_signal(signal.SIGKILL)

            failed = wait_until_ended(client, job_id, timeout=300)  # the deadline only guards a hang
            assert (failed["status"], failed["attempts"]) == ("failed", 1), (failed, pair.log()[-3000:])
            reason = failed["failure_reason"]
            assert f"rank 1 (local rank 1, pid {victim.pid}) was killed by SIGKILL" in reason, reason
            assert "most likely because the machine ran out of memory" in reason, reason  # what to do
            assert failed["step"] < 10_000 and "Traceback" not in reason, failed
            assert all(ended(process) for process in ranks.values()), ranks
            assert rank_processes(pair) == {}
            assert not list(settings.job_dir(job_id).glob(".rank*-outcome.json"))
            assert pair.process is not None and pair.process.poll() is None  # the worker lives on
    finally:
        pair.stop()
        pair.forget_broker_keys()
