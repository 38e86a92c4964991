"""Pause and resume, and the failure reasons a user can act on, end to end: the API, PostgreSQL,
Redis and a real worker process. (Running out of memory is tested on the trainer, in
tests/trainer/test_failures.py: it needs a process with a memory limit.)"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.service.e2e import metric_steps, status_changes, wait_for_status, wait_for_step, wait_until_ended
from tests.service.factories import WorkerProcess, api_key, bearer, job_spec, upload
from tests.service.faults import ScoringEndpoint
from trainer.checkpoint import checkpoints_on_disk

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def worker(redis_worker_settings) -> Iterator[WorkerProcess]:
    # Two slots: each job starts at once in a ready pool process while the last one's is replaced
    # (Celery replaces a recycled pool process only on a 5 s timer at times: celery/celery#9588).
    worker = WorkerProcess(redis_worker_settings, concurrency=2).start()
    yield worker
    worker.stop()
    worker.forget_broker_keys()


@pytest.fixture(scope="module")
def client(redis_worker_settings, worker) -> Iterator[TestClient]:
    settings = redis_worker_settings
    with TestClient(create_app(settings), headers=bearer(api_key(settings))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def dataset_id(client) -> str:
    return upload(client).json()["id"]


def checkpoint_steps(client, job_id: str) -> list[int]:
    return [c["step"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]]


def events(client, job_id: str) -> list[str]:
    return [
        e["message"] for e in client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    ]


def failed(client, worker: WorkerProcess, job_id: str) -> dict[str, Any]:
    """The job, once it has failed with a reason meant for a person (not a stack trace)."""
    job = wait_until_ended(client, job_id, timeout=120)
    assert job["status"] == "failed", (job, worker.log()[-3000:])
    assert "Traceback" not in job["failure_reason"] and "internal error" not in job["failure_reason"], job
    assert worker.process is not None and worker.process.poll() is None  # the worker lives on
    return job


def test_a_running_job_pauses_with_a_checkpoint_and_resumes_from_it(
    client, worker, dataset_id, tiny_model
) -> None:
    spec = job_spec(dataset_id, str(tiny_model), hyperparameters={"max_steps": 12, "checkpoint_every": 0})
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    wait_for_step(client, job_id, 2)
    asked = client.post(f"/v1/jobs/{job_id}/pause").json()
    assert asked["status"] == "running" and asked["pause_requested"] is True

    paused = wait_for_status(client, job_id, "paused")
    reached = paused["step"]
    assert 2 <= reached < 12 and paused["worker"] is None and paused["pause_requested"] is False
    assert checkpoint_steps(client, job_id) == [reached]  # written as it stopped (checkpoint_every is 0)
    assert metric_steps(client, job_id) == list(range(1, reached + 1))
    assert (
        client.post(f"/v1/jobs/{job_id}/pause").json()["status"] == "paused"
    )  # pausing again changes nothing

    resumed = client.post(f"/v1/jobs/{job_id}/resume").json()
    assert (resumed["status"], resumed["attempts"]) == ("queued", 0)
    job = wait_until_ended(client, job_id)
    assert (job["status"], job["step"]) == ("succeeded", 12), (job, worker.log()[-3000:])
    assert metric_steps(client, job_id) == list(range(1, 13))  # each step once: the second run went on
    assert status_changes(client, job_id) == ["queued", "running", "paused", "queued", "running", "succeeded"]
    assert f"resuming after step {reached} of 12" in events(client, job_id)
    response = client.post(f"/v1/jobs/{job_id}/resume")
    assert response.status_code == 409 and "only a paused job" in response.json()["error"]["message"]


def test_a_diverging_job_fails_and_names_its_last_good_checkpoint(
    client, worker, dataset_id, tiny_model, redis_worker_settings
) -> None:
    # Step 1's completions all score alike: no signal, so the weights stay as loaded. Later steps
    # score unevenly, and step 2's update, at a learning rate of 1e30, blows the weights up.
    def scores(call: int, completions: int) -> tuple[int, dict[str, Any]]:
        return 200, {"rewards": [0.0 if call == 1 else float(i % 2) for i in range(completions)]}

    with ScoringEndpoint(scores) as endpoint:
        spec = job_spec(
            dataset_id,
            str(tiny_model),
            reward=[endpoint.reward()],
            hyperparameters={"max_steps": 6, "checkpoint_every": 1, "learning_rate": 1e30, "beta": 0.0},
        )
        job = failed(client, worker, client.post("/v1/jobs", json=spec).json()["id"])
    reason = job["failure_reason"]
    assert "training diverged at step 3" in reason and "inf or NaN" in reason, reason
    assert "the last good checkpoint, step-000001, is kept" in reason and "step-000002" in reason, reason
    assert "Lower learning_rate (it is 1e+30)" in reason
    assert checkpoint_steps(client, job["id"]) == [1]  # the diverged weights' checkpoint is not listed
    assert [step for step, _ in checkpoints_on_disk(redis_worker_settings.job_dir(job["id"]))] == [
        1
    ]  # nor kept


def test_a_model_directory_that_cannot_be_loaded_fails_naming_it(
    client, worker, dataset_id, tmp_path
) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # passes the API's check; no weights
    job = failed(
        client, worker, client.post("/v1/jobs", json=job_spec(dataset_id, str(tmp_path))).json()["id"]
    )
    assert f"could not load the tokenizer of base_model '{tmp_path}'" in job["failure_reason"]


def test_a_dataset_whose_every_prompt_is_too_long_fails_naming_max_prompt_length(
    client, worker, tiny_model
) -> None:
    # more rows than the API measures (PROMPT_SAMPLE_ROWS): it cannot be certain, so it creates the
    # job (a dataset it measured whole is refused at creation: test_prompts_that_cannot_fit.py)
    rows = [{"prompt": f"What is {i % 10} + {i % 5}?", "answer": str(i % 10 + i % 5)} for i in range(201)]
    spec = job_spec(
        upload(client, rows).json()["id"], str(tiny_model), hyperparameters={"max_prompt_length": 4}
    )
    job = failed(client, worker, client.post("/v1/jobs", json=spec).json()["id"])
    reason = job["failure_reason"]
    # the prompts are "What is i + j?": 14 characters, one token each
    assert reason.startswith(
        "hyperparameters.max_prompt_length: every prompt of the dataset is longer than "
        "max_prompt_length (4 tokens): the shortest is 14 tokens"
    ), reason
    assert "Raise max_prompt_length to at least 14" in reason and job["step"] == 0


def test_a_reward_endpoint_that_keeps_failing_fails_the_job_naming_it(
    client, worker, dataset_id, tiny_model
) -> None:
    with ScoringEndpoint(lambda call, completions: (500, {"error": "scorer down"})) as endpoint:
        spec = job_spec(
            dataset_id,
            str(tiny_model),
            reward=[endpoint.reward(name="scorer")],
            hyperparameters={"max_steps": 20},
        )
        job = failed(client, worker, client.post("/v1/jobs", json=spec).json()["id"])
    reason = job["failure_reason"]
    assert "reward 'scorer' failed on every completion for 3 steps in a row (steps 1-3)" in reason, reason
    assert endpoint.url in reason and "500" in reason and "max_reward_error_steps" in reason
    assert job["step"] == 3 and endpoint.calls == 3


def test_a_full_disk_fails_the_job_and_leaves_no_partial_checkpoint(
    client, worker, dataset_id, tiny_model, redis_worker_settings
) -> None:
    jobs_dir = redis_worker_settings.artifact_dir / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    # room for one checkpoint of the tiny model (~0.5 MB with the optimizer state), not two
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=720k", "tmpfs", str(jobs_dir)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        spec = job_spec(dataset_id, str(tiny_model), hyperparameters={"max_steps": 4, "checkpoint_every": 1})
        job = failed(client, worker, client.post("/v1/jobs", json=spec).json()["id"])
        checkpoints = jobs_dir / job["id"] / "checkpoints"
        on_disk = sorted(p.name for p in checkpoints.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(jobs_dir)], check=True)
    reason = job["failure_reason"]
    assert reason.startswith(
        f"disk full while writing the checkpoint of step 2 to {checkpoints / 'step-000002'}"
    ), reason
    assert "MB free" in reason and "keep_last_checkpoints" in reason
    assert on_disk == ["step-000001"]  # no half-written step-000002, no temporary directory
    assert checkpoint_steps(client, job["id"]) == [1]
