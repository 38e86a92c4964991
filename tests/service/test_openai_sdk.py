"""The official ``openai`` SDK against the live service: uvicorn on loopback, PostgreSQL, Redis
and a real worker process training the tiny model through the OpenAI-compatible routes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import FileObject
from openai.types.fine_tuning import FineTuningJob

from api.main import create_app
from tests.service.factories import api_key, jsonl, wait_for
from tests.service.live import serve

pytestmark = pytest.mark.slow

TERMINAL = {"succeeded", "failed", "cancelled"}
EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.reference_answer}}",
    "operation": "eq",
}
TINY = {
    "group_size": 2,
    "max_completion_length": 8,
    "max_prompt_length": 64,
    "learning_rate_multiplier": 1000,
}


def rft_rows(n: int = 8) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "developer", "content": "Reply with the number."},
                {"role": "user", "content": f"What is {i} + {i % 3}?"},
            ],
            "reference_answer": str(i + i % 3),
        }
        for i in range(n)
    ]


def reinforcement(grader: dict, **hyperparameters) -> dict:
    return {
        "type": "reinforcement",
        "reinforcement": {"grader": grader, "hyperparameters": {**TINY, **hyperparameters}},
    }


@pytest.fixture(scope="module")
def server(redis_worker_settings, redis_worker) -> Iterator[str]:
    with serve(create_app(redis_worker_settings)) as url:  # sends jobs to Redis, where the worker takes them
        yield url


def sdk(server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def client(server, redis_worker_settings) -> Iterator[openai.OpenAI]:
    with sdk(server, api_key(redis_worker_settings)) as client:
        yield client


@pytest.fixture(scope="module")
def training_file(client, tmp_path_factory) -> FileObject:
    path = tmp_path_factory.mktemp("rft") / "train.jsonl"
    path.write_bytes(jsonl(rft_rows()))
    with path.open("rb") as file:
        return client.files.create(file=file, purpose="fine-tune")


def wait_until_ended(client: openai.OpenAI, job_id: str, timeout: float = 180) -> FineTuningJob:
    def ended() -> FineTuningJob | None:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in TERMINAL else None

    return wait_for(ended, timeout=timeout, what=f"job {job_id} to end", interval=0.2)


def test_files_upload_list_retrieve_and_content(client, training_file) -> None:
    assert (training_file.object, training_file.purpose, training_file.status) == (
        "file",
        "fine-tune",
        "processed",
    )
    assert training_file.filename == "train.jsonl" and training_file.bytes > 0
    assert client.files.retrieve(training_file.id) == training_file
    assert training_file.id in [file.id for file in client.files.list()]
    first_line = client.files.content(training_file.id).text.splitlines()[0]
    assert '"prompt": [{"role": "system", "content": "Reply with the number."}' in first_line


def test_a_reinforcement_job_runs_to_success(client, server, training_file, tiny_model, redis_worker) -> None:
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model),
        training_file=training_file.id,
        suffix="sdk",
        seed=3,
        metadata={"case": "success"},
        method=reinforcement(EXACT, n_epochs=1, batch_size=4, checkpoint_every=1),
    )
    assert (job.object, job.status, job.model, job.seed, job.suffix) == (
        "fine_tuning.job",
        "queued",
        str(tiny_model),
        3,
        "sdk",
    )
    assert job.method.type == "reinforcement" and job.method.reinforcement.grader.operation == "eq"
    assert job.model_extra["max_steps"] == 2  # 1 epoch of 8 rows, 4 a step

    job = wait_until_ended(client, job.id)
    assert job.status == "succeeded", (job, redis_worker.log()[-3000:])
    assert job.error is None and job.finished_at >= job.created_at
    assert job.fine_tuned_model == f"ft:{tiny_model.name}:alice:sdk:{job.id}:ckpt-step-2"
    native = client.get(f"/jobs/{job.id}", cast_to=object)  # the same job through the native API
    assert job.trained_tokens == native["latest_metrics"]["num_tokens"] > 0  # every token the two steps saw
    assert (
        client.fine_tuning.jobs.list(metadata={"case": "success"}).data[0].trained_tokens
        == job.trained_tokens
    )

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))  # every page, newest first
    statuses = [e.data["status"] for e in events if e.data and "status" in e.data]
    assert statuses == ["succeeded", "running", "queued"]
    assert all(e.object == "fine_tuning.job.event" and e.level in ("info", "warn") for e in events)

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [2, 1]
    assert checkpoints[0].fine_tuned_model_checkpoint == job.fine_tuned_model
    assert isinstance(checkpoints[0].metrics.train_loss, float) and checkpoints[0].metrics.step == 2
    download_url = checkpoints[0].model_extra["download_url"]
    assert download_url == f"{server}/v1/jobs/{job.id}/checkpoints/2/download"
    assert client.get(download_url, cast_to=httpx.Response).headers["content-type"] == "application/x-tar"

    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"case": "success"})] == [job.id]


def test_pause_resume_and_cancel(client, training_file, tiny_model) -> None:
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model),
        training_file=training_file.id,
        method=reinforcement(EXACT, max_steps=500, checkpoint_every=0),
    )
    wait_for(
        lambda: client.fine_tuning.jobs.retrieve(job.id).model_extra["step"] >= 1,
        timeout=60,
        what="the first step",
    )
    client.fine_tuning.jobs.pause(job.id)
    wait_for(
        lambda: client.fine_tuning.jobs.retrieve(job.id).status == "paused",
        timeout=60,
        what="the pause",
        interval=0.2,
    )
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    client.fine_tuning.jobs.cancel(job.id)
    assert wait_until_ended(client, job.id, timeout=60).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(job.id)


def test_refusals_arrive_as_the_sdks_errors(
    client, server, redis_worker_settings, training_file, tiny_model
) -> None:
    fuzzy_bleu = {
        "type": "text_similarity",
        "name": "sim",
        "input": "{{sample.output_text}}",
        "reference": "{{item.reference_answer}}",
        "evaluation_metric": "bleu",
    }
    with pytest.raises(openai.BadRequestError) as bad_grader:
        client.fine_tuning.jobs.create(
            model=str(tiny_model), training_file=training_file.id, method=reinforcement(fuzzy_bleu)
        )
    assert bad_grader.value.param == "method.reinforcement.grader.evaluation_metric"
    assert "method.reinforcement.grader.evaluation_metric" in str(bad_grader.value)
    assert "'bleu' is not supported here" in str(bad_grader.value)

    with pytest.raises(openai.BadRequestError) as supervised:
        client.fine_tuning.jobs.create(
            model=str(tiny_model),
            training_file=training_file.id,
            method={"type": "supervised", "supervised": {}},
        )
    assert supervised.value.param == "method.type"

    with pytest.raises(openai.BadRequestError) as not_jsonl, Path(__file__).open("rb") as python_file:
        client.files.create(file=python_file, purpose="fine-tune")
    assert not_jsonl.value.param == "file"

    mine = client.fine_tuning.jobs.create(
        model="org/model", training_file=training_file.id, method=reinforcement(EXACT, max_steps=1)
    )
    client.fine_tuning.jobs.cancel(mine.id)
    with sdk(server, api_key(redis_worker_settings, owner="bob")) as bob:
        with pytest.raises(openai.NotFoundError) as theirs:
            bob.fine_tuning.jobs.retrieve(mine.id)
        assert theirs.value.code == "job_not_found"
        with pytest.raises(openai.NotFoundError):
            bob.fine_tuning.jobs.cancel(mine.id)
        with pytest.raises(openai.NotFoundError):
            bob.files.retrieve(training_file.id)
        assert mine.id not in [job.id for job in bob.fine_tuning.jobs.list()]
    with sdk(server, "grpo_wrong") as stranger, pytest.raises(openai.AuthenticationError):
        stranger.fine_tuning.jobs.list()
