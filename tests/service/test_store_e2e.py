"""Many machines sharing one object store: the API, real Celery worker processes on Redis and
PostgreSQL, and a real S3 server (SeaweedFS), each process with an artifact directory of its own,
so that every byte one of them reads of another's artifacts came through the store."""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from api.main import create_app
from jobs.chat import resolve_target
from jobs.db import transaction
from jobs.settings import Settings
from jobs.store import MANIFEST
from tests.service.e2e import download_and_load, metric_steps, status_changes, wait_until_ended
from tests.service.factories import (
    WorkerProcess,
    api_key,
    arithmetic_rows,
    bearer,
    job_spec,
    jsonl,
    upload,
    wait_for,
)
from tests.service.s3 import S3Server, running_s3_server
from worker.inference import SERVING_CACHE, checkpoint_source, load

pytestmark = pytest.mark.slow


def machine(settings: Settings, directory: Path, **update) -> Settings:
    """``settings`` as a process on another machine has them: its own data and artifact directory."""
    directory.mkdir(parents=True)
    return settings.model_copy(
        update={"data_dir": directory, "artifact_dir": directory / "artifacts", **update}
    )


@pytest.fixture(scope="module")
def shared(redis_worker_settings: Settings, s3_server: S3Server) -> Settings:
    """What every process of this module shares: database, broker, and a prefix of the bucket."""
    return redis_worker_settings.model_copy(update=s3_server.settings())


@pytest.fixture(scope="module")
def api_settings(shared: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return machine(shared, tmp_path_factory.mktemp("api") / "machine")


@pytest.fixture(scope="module")
def worker(shared: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(machine(shared, tmp_path_factory.mktemp("worker") / "machine")).start()
    yield worker
    worker.stop()
    worker.forget_broker_keys()


@pytest.fixture(scope="module")
def client(api_settings: Settings, worker: WorkerProcess) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings), headers=bearer(api_key(api_settings))) as test_client:
        yield test_client


def stored_keys(s3_server: S3Server, settings: Settings, under: str) -> list[str]:
    assert settings.store_url is not None
    prefix = settings.store_url.removeprefix(f"s3://{s3_server.bucket}/")
    pages = (
        s3_server.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=s3_server.bucket, Prefix=f"{prefix}/{under}")
    )
    return sorted(item["Key"][len(prefix) + 1 :] for page in pages for item in page.get("Contents", ()))


def test_a_job_trains_on_one_machine_and_downloads_from_another(
    client, api_settings, worker, s3_server, tiny_model, tmp_path
) -> None:
    content = jsonl(arithmetic_rows())
    dataset_id = upload(client, content=content).json()["id"]
    assert stored_keys(s3_server, api_settings, "datasets/") == [f"datasets/{dataset_id}.jsonl"]

    spec = job_spec(dataset_id, str(tiny_model), hyperparameters={"max_steps": 4, "checkpoint_every": 2})
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    job = wait_until_ended(client, job_id)
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    assert [c["step"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]] == [2, 4]

    # the worker read the dataset from the store into its own cache, and wrote its checkpoints there
    worker_artifacts = worker.settings.artifact_dir
    assert (worker_artifacts / "datasets" / f"{dataset_id}.jsonl").read_bytes() == content
    assert (worker_artifacts / "jobs" / job_id / "checkpoints" / "step-000004" / MANIFEST).is_file()
    stored = stored_keys(s3_server, api_settings, f"jobs/{job_id}/")
    checkpoint = f"jobs/{job_id}/checkpoints/step-000004"
    assert {f"{checkpoint}/{MANIFEST}", f"{checkpoint}/model.safetensors"} <= set(stored)
    assert f"{checkpoint}/trainer_state/state.json" in stored  # what a resume elsewhere needs
    assert f"jobs/{job_id}/metrics.jsonl" in stored

    # the API's machine never had the checkpoint: the tar streamed from the store
    model = download_and_load(client, job_id, 4, tmp_path)
    assert not (api_settings.artifact_dir / "jobs").exists()
    trained = (
        worker_artifacts / "jobs" / job_id / "checkpoints" / "step-000004" / "model.safetensors"
    ).read_bytes()
    extracted = (tmp_path / f"{job_id}-step-4" / "model.safetensors").read_bytes()
    assert extracted == trained and next(model.parameters()).isfinite().all()

    # the API's chat route finds the checkpoint complete in the store (the inference worker fetches it)
    with transaction(api_settings.database_url) as session:
        target = resolve_target(session=session, owner="alice", model=f"{job_id}:4", settings=api_settings)
    assert target.step == 4


def test_a_dataset_downloads_from_the_store_streamed_or_through_a_presigned_url(
    client, api_settings, tmp_path
) -> None:
    content = jsonl(arithmetic_rows(40))
    file_id = upload(client, content=content, name="sums.jsonl").json()["id"]

    elsewhere = machine(api_settings, tmp_path / "other-api")  # an API process that did not take the upload
    with TestClient(create_app(elsewhere), headers=dict(client.headers)) as other:
        streamed = other.get(f"/v1/files/{file_id}/content")
        assert streamed.status_code == 200 and streamed.content == content
        assert streamed.headers["content-length"] == str(len(content))
        assert streamed.headers["content-disposition"] == 'attachment; filename="sums.jsonl"'
        assert not (elsewhere.artifact_dir / "datasets" / f"{file_id}.jsonl").exists()
        # a dry run there counts the prompts of the dataset it fetched from the store
        spec = job_spec(file_id, "Qwen/Qwen2.5-0.5B-Instruct")
        estimate = other.post("/v1/jobs", params={"dry_run": "true"}, json=spec)
        assert estimate.status_code == 200, estimate.text
        assert not any("could not be read" in note for note in estimate.json()["notes"])
        assert (elsewhere.artifact_dir / "datasets" / f"{file_id}.jsonl").read_bytes() == content

    presigning = elsewhere.model_copy(update={"store_presigned_downloads": True})
    with TestClient(create_app(presigning), headers=dict(client.headers), follow_redirects=False) as other:
        redirect = other.get(f"/v1/files/{file_id}/content")
        assert redirect.status_code == 307
        fetched = httpx.get(redirect.headers["location"])  # no API key: the URL is the credential
        assert fetched.status_code == 200 and fetched.content == content

    assert client.delete(f"/v1/files/{file_id}").status_code == 200
    assert client.get(f"/v1/files/{file_id}/content").status_code == 404
    assert httpx.get(redirect.headers["location"]).status_code == 404  # gone from the store too


def test_a_lora_jobs_merged_model_is_served_from_the_store(
    client, api_settings, worker, tiny_model, tmp_path
) -> None:
    dataset_id = upload(client).json()["id"]
    spec = job_spec(
        dataset_id,
        str(tiny_model),
        hyperparameters={"max_steps": 2, "learning_rate": 1e-2, "lora": {"r": 4, "alpha": 8}},
        reward=[{"type": "regex", "pattern": "[0-9]", "score": "fraction"}],
    )
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    job = wait_until_ended(client, job_id)
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    final = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"][-1]
    assert final["kind"] == "adapter" and final["merged_download_url"].endswith("?format=merged")

    response = client.get(f"/v1/jobs/{job_id}/checkpoints/2/download", params={"format": "merged"})
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        archive.extractall(tmp_path, filter="data")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / f"{job_id}-step-2-merged").eval()

    # an inference worker on a third machine fetches the merged model into its cache and serves it
    inference = machine(api_settings, tmp_path / "inference")
    source = checkpoint_source({"job_id": job_id, "step": 2}, inference)
    assert source.base_model is None and source.key[-1] == "merged"
    assert (
        source.directory
        == inference.artifact_dir / SERVING_CACHE / "jobs" / job_id / "merged" / "step-000002"
    )
    served, _ = load(source)
    tokens = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.equal(served(tokens).logits, merged(tokens).logits)
    assert checkpoint_source({"job_id": job_id, "step": 2}, inference).directory == source.directory


def test_a_worker_killed_mid_job_is_followed_by_one_on_another_machine_that_resumes_from_the_store(
    shared, s3_server, make_database, tiny_model, tmp_path
) -> None:
    # a database and queue of its own: the module's worker (and its sweeper) never sees this job
    tag = uuid.uuid4().hex[:8]
    settings = shared.model_copy(
        update={
            "database_url": make_database(),
            "queue": f"gpu-{tag}",
            "broker_key_prefix": f"grpo-test-{tag}:",
        }
    )
    first = WorkerProcess(machine(settings, tmp_path / "first"))
    second = WorkerProcess(machine(settings, tmp_path / "second"))
    api = machine(settings, tmp_path / "api")
    first.start()
    try:
        with TestClient(create_app(api), headers=bearer(api_key(api))) as client:
            dataset_id = upload(client).json()["id"]
            spec = job_spec(
                dataset_id, str(tiny_model), hyperparameters={"max_steps": 16, "checkpoint_every": 2}
            )
            job_id = client.post("/v1/jobs", json=spec).json()["id"]

            def past_a_checkpoint() -> dict | None:
                job = client.get(f"/v1/jobs/{job_id}").json()
                assert job["status"] in ("queued", "running"), job
                recorded = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
                # two recorded: the second machine must also prune one it never had on its disk
                return job if len(recorded) >= 2 and job["step"] >= recorded[-1]["step"] + 1 else None

            wait_for(
                past_a_checkpoint,
                timeout=120,
                what="the first worker to train past a checkpoint",
                interval=0.05,
            )
            first.kill()  # its pool process too: no shutdown, no upload left half done is ever recorded
            recorded = [c["step"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]]
            second.start()

            job = wait_until_ended(client, job_id)
            assert job["status"] == "succeeded", (job, second.log()[-3000:])
            assert (job["step"], job["attempts"]) == (16, 2)
            assert status_changes(client, job_id) == ["queued", "running", "queued", "running", "succeeded"]
            assert metric_steps(client, job_id) == list(range(1, 17))
            events = [
                e["message"]
                for e in client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
            ]
            resumed = [int(m.split()[3]) for m in events if m.startswith("resuming after step ")]
            assert resumed == [recorded[-1]], (events, recorded)  # the newest checkpoint recorded at the kill

            # the second machine never saw the first's disk: it fetched that checkpoint from the store
            second_job = second.settings.job_dir(job_id)
            assert any(
                f"fetched jobs/{job_id}/checkpoints/step-{resumed[0]:06d}" in line
                for line in second.log().splitlines()
            )
            kept = [c["step"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]]
            assert kept == [14, 16]  # keep_last_checkpoints: 2, those recorded by the first machine included
            on_disk = sorted(p.name for p in (second_job / "checkpoints").iterdir())
            assert on_disk == [
                f"step-{step:06d}" for step in kept
            ]  # the record, the disk and the store agree
            complete = [
                key.split("/")[3]
                for key in stored_keys(s3_server, api, f"jobs/{job_id}/checkpoints/")
                if key.endswith(MANIFEST)
            ]
            assert complete == on_disk
            download_and_load(client, job_id, 16, tmp_path)
    finally:
        for process in (first, second):
            process.stop()
        first.forget_broker_keys()


def test_a_job_whose_store_goes_out_of_reach_says_so_on_its_record(
    shared, make_database, tiny_model, tmp_path
) -> None:
    """The store gone mid-job: the attempt gives the job up (the sweeper re-queues it once its
    lease is stale) and says why on the record at once, where the user reads it."""
    tag = uuid.uuid4().hex[:8]
    (tmp_path / "s3").mkdir()
    with running_s3_server(tmp_path / "s3") as store:  # its own: this test stops it
        settings = shared.model_copy(
            update={
                **store.settings(),
                "database_url": make_database(),
                "queue": f"gpu-{tag}",
                "broker_key_prefix": f"grpo-test-{tag}:",
            }
        )
        worker = WorkerProcess(machine(settings, tmp_path / "worker")).start()
        api = machine(settings, tmp_path / "api")
        try:
            with TestClient(create_app(api), headers=bearer(api_key(api))) as client:
                dataset_id = upload(client).json()["id"]
                spec = job_spec(
                    dataset_id, str(tiny_model), hyperparameters={"max_steps": 500, "checkpoint_every": 1}
                )
                job_id = client.post("/v1/jobs", json=spec).json()["id"]
                wait_for(
                    lambda: client.get(f"/v1/jobs/{job_id}").json()["step"] >= 1 or None,
                    timeout=120,
                    what="the job's first step",
                )
                assert store.weed is not None
                store.weed.kill()

                def given_up() -> list[dict] | None:
                    events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
                    said = "this attempt gave up: the artifact store was out of reach"
                    return [e for e in events if e["message"].startswith(said)] or None

                (event,) = wait_for(given_up, timeout=300, what="the attempt to say it gave up")
                assert event["level"] == "warning", event
                assert "resumes from its newest checkpoint" in event["message"], event
                job = client.get(f"/v1/jobs/{job_id}").json()
                assert job["status"] == "running" and job["step"] < 500, (
                    job
                )  # re-queued once its lease is stale
        finally:
            worker.kill()
            worker.forget_broker_keys()
