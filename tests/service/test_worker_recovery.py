"""Workers killed with SIGKILL mid-job, three times over: each time the sweeper re-queues the job,
the next worker resumes it from its newest checkpoint, and in the end the job succeeds with
every step's metrics recorded exactly once."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.service.e2e import metric_steps, status_changes, wait_until_ended
from tests.service.factories import WorkerProcess, api_key, bearer, job_spec, upload, wait_for

pytestmark = pytest.mark.slow


def test_a_job_whose_worker_is_killed_three_times_resumes_each_time_and_succeeds(
    redis_worker_settings, tiny_model
) -> None:
    settings = redis_worker_settings.model_copy(update={"max_attempts": 4})  # GRPO_MAX_ATTEMPTS: 3 losses + 1
    workers = [WorkerProcess(settings) for _ in range(4)]
    workers[0].start()
    try:
        with TestClient(create_app(settings), headers=bearer(api_key(settings))) as client:
            dataset_id = upload(client).json()["id"]
            spec = job_spec(
                dataset_id, str(tiny_model), hyperparameters={"max_steps": 20, "checkpoint_every": 2}
            )
            job_id = client.post("/v1/jobs", json=spec).json()["id"]
            resumed_after = 0
            for attempt, (doomed, successor) in enumerate(zip(workers, workers[1:], strict=False), start=1):

                def trained_past_a_checkpoint(
                    attempt: int = attempt, since: int = resumed_after
                ) -> dict | None:
                    job = client.get(f"/v1/jobs/{job_id}").json()
                    assert job["status"] in ("queued", "running"), job
                    return job if job["attempts"] == attempt and job["step"] >= since + 3 else None

                job = wait_for(
                    trained_past_a_checkpoint, timeout=120, what=f"attempt {attempt} to train", interval=0.05
                )
                doomed.kill()  # its pool process too: no shutdown, no acknowledgement, no last words
                successor.start()  # it takes the job once the sweeper sees the heartbeat go stale
                resumed_after = job["step"] - job["step"] % 2  # the newest checkpoint at least, maybe later

            job = wait_until_ended(client, job_id)
            assert job["status"] == "succeeded", (job, workers[-1].log()[-3000:])
            assert (job["step"], job["attempts"]) == (20, 4)
            assert status_changes(client, job_id) == ["queued", "running"] * 4 + ["succeeded"]
            assert metric_steps(client, job_id) == list(range(1, 21))  # once each: replayed steps overwrote
            events = [
                e["message"]
                for e in client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
            ]
            resumes = [int(m.split()[3]) for m in events if m.startswith("resuming after step ")]
            assert len(resumes) == 3 and resumes == sorted(resumes) and resumes[0] >= 2, events
            for doomed in workers[:3]:
                assert any(doomed.name in m and "stopped sending heartbeats" in m for m in events), events
    finally:
        for worker in workers:
            worker.stop()
        workers[0].forget_broker_keys()
