"""Idempotency-Key on POST /v1/jobs and POST /v1/datasets, on PostgreSQL: the same key and body
within 24 h return the original, another body is a 409, keys are per owner and expire."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import func, select, update

from jobs.db import transaction
from jobs.models import Dataset, IdempotencyKey, Job, utcnow
from jobs.submission import ENDPOINT
from tests.service.factories import api_key, arithmetic_rows, bearer, job_spec, jsonl, upload
from tests.service.test_openai_api import rft_job, upload_file


def count(settings, model) -> int:
    with transaction(settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(model))


def age_keys(settings, hours: float) -> None:
    with transaction(settings.database_url) as session:
        session.execute(update(IdempotencyKey).values(created_at=utcnow() - timedelta(hours=hours)))


@pytest.fixture
def dataset_id(client) -> str:
    return upload(client).json()["id"]


def test_job_keys_are_per_owner(client, settings, sent, dataset_id) -> None:
    bob = bearer(api_key(settings, owner="bob"))
    bobs_dataset = upload(client, headers=bob).json()["id"]
    key = {"Idempotency-Key": "nightly-run"}
    alices = client.post("/v1/jobs", json=job_spec(dataset_id), headers=key)
    bobs = client.post("/v1/jobs", json=job_spec(bobs_dataset), headers={**key, **bob})
    assert alices.status_code == bobs.status_code == 201 and alices.json()["id"] != bobs.json()["id"]
    assert "Idempotent-Replayed" not in bobs.headers
    again = client.post("/v1/jobs", json=job_spec(bobs_dataset), headers={**key, **bob})
    assert again.json()["id"] == bobs.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert sent == [alices.json()["id"], bobs.json()["id"]]


def test_a_job_key_expires_after_24_hours(client, settings, sent, dataset_id) -> None:
    key = {"Idempotency-Key": "k"}
    first = client.post("/v1/jobs", json=job_spec(dataset_id), headers=key).json()["id"]
    age_keys(settings, hours=23.9)
    assert client.post("/v1/jobs", json=job_spec(dataset_id), headers=key).json()["id"] == first
    age_keys(settings, hours=24.1)
    later = client.post("/v1/jobs", json=job_spec(dataset_id, name="another"), headers=key)
    assert (
        later.status_code == 201
        and later.json()["id"] != first
        and "Idempotent-Replayed" not in later.headers
    )
    assert (
        client.post("/v1/jobs", json=job_spec(dataset_id, name="another"), headers=key).json()["id"]
        == later.json()["id"]
    )
    assert count(settings, Job) == 2 and count(settings, IdempotencyKey) == 1


def test_a_replay_is_not_refused_by_the_active_jobs_limit(client, settings, dataset_id) -> None:
    settings.max_active_jobs_per_owner = 1
    key = {"Idempotency-Key": "once"}
    first = client.post("/v1/jobs", json=job_spec(dataset_id), headers=key)
    again = client.post("/v1/jobs", json=job_spec(dataset_id), headers=key)
    assert (first.status_code, again.status_code) == (201, 201) and again.json()["id"] == first.json()["id"]


def test_concurrent_requests_with_one_key_make_one_job(client, settings, sent, dataset_id) -> None:
    def post(_: int):
        return client.post("/v1/jobs", json=job_spec(dataset_id), headers={"Idempotency-Key": "race"})

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(post, range(4)))
    made = {r.json()["id"] for r in responses if r.status_code == 201}
    in_progress = [r for r in responses if r.status_code == 409]
    assert len(made) == 1 and all(r.status_code in (201, 409) for r in responses)  # 409: retry, then replayed
    assert all("being processed" in r.json()["error"]["message"] for r in in_progress)
    assert all(r.headers["Retry-After"] == "1" for r in in_progress)
    assert count(settings, Job) == 1 and sent == list(made)


def overtaken(client, settings, path: str, body: dict[str, Any], *, made_with: str) -> httpx.Response:
    """POST ``body`` with the Idempotency-Key "race" while another request with that key, for the
    same body, is about to commit: its row (a copy of the one key ``made_with`` left, naming the
    same job) is inserted by an open transaction, committed once the request waits on it. The
    race ``test_concurrent_requests_with_one_key_make_one_job`` may or may not hit, every time."""
    with transaction(settings.database_url) as session:
        made = session.get(IdempotencyKey, ("alice", ENDPOINT, made_with))
        row = ("alice", ENDPOINT, "race", made.request_hash, made.resource_id)
    url = settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    with (
        psycopg.connect(url) as holder,
        psycopg.connect(url, autocommit=True) as watcher,
        ThreadPoolExecutor(1) as pool,
    ):
        holder.execute(
            "INSERT INTO idempotency_keys (owner, endpoint, key, request_hash, resource_id, created_at) "
            "VALUES (%s, %s, %s, %s, %s, now())",
            row,
        )
        pending = pool.submit(client.post, path, json=body, headers={"Idempotency-Key": "race"})
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
        deadline = time.monotonic() + 120  # a guard against a hang, not a measurement
        while not watcher.execute(waiting, (holder.info.backend_pid,)).fetchone()[0]:
            assert not pending.done(), pending.result().text  # it must wait on the held row
            assert time.monotonic() < deadline, "the request never waited on the held key"
            time.sleep(0.01)
        holder.commit()
        return pending.result()


def test_a_request_overtaken_by_another_with_its_key_is_told_when_to_retry(client, settings, sent) -> None:
    dataset_id = upload(client).json()["id"]
    first = client.post("/v1/jobs", json=job_spec(dataset_id), headers={"Idempotency-Key": "first"}).json()
    response = overtaken(client, settings, "/v1/jobs", job_spec(dataset_id), made_with="first")
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("conflict", "Idempotency-Key")
    assert "being processed; retry it in 1 s" in error["message"]
    assert response.headers["Retry-After"] == "1"  # what the message says, as a 429 has it
    retried = client.post("/v1/jobs", json=job_spec(dataset_id), headers={"Idempotency-Key": "race"})
    assert retried.status_code == 201 and retried.json()["id"] == first["id"]
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert count(settings, Job) == 1 and sent == [first["id"]]  # the overtaken request's job rolled back


def test_on_the_openai_route_that_409_is_one_the_sdk_retries(client, settings, sent) -> None:
    """OpenAI's SDK retries a 409 unless told ``x-should-retry: false``, as every other 409 here
    is; this one says "retry it", so it says ``true``."""
    body = rft_job(upload_file(client).json()["id"])
    first = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "first"}).json()
    response = overtaken(client, settings, "/v1/fine_tuning/jobs", body, made_with="first")
    assert response.status_code == 409, response.text
    assert response.headers["x-should-retry"] == "true" and response.headers["Retry-After"] == "1"
    assert response.json()["error"]["message"].startswith("Idempotency-Key: another request")
    retried = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "race"})
    assert retried.status_code == 200 and retried.json()["id"] == first["id"], retried.text
    assert sent == [first["id"]]


def test_a_dataset_retried_with_its_key_is_the_same_dataset(client, settings) -> None:
    key = {"Idempotency-Key": "upload-1"}
    first = upload(client, headers=key)
    again = upload(client, headers=key)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert count(settings, Dataset) == 1
    assert sorted(p.name for p in settings.datasets_dir.iterdir()) == [f"{first.json()['id']}.jsonl"]


@pytest.mark.parametrize("change", [{"rows": arithmetic_rows(3)}, {"name": "other.jsonl"}])
def test_a_dataset_key_with_another_body_is_409_and_stores_nothing(client, settings, change) -> None:
    key = {"Idempotency-Key": "upload-1"}
    first = upload(client, headers=key).json()
    response = upload(client, headers=key, **change)
    assert response.status_code == 409 and response.json()["error"]["code"] == "idempotency_key_reused"
    assert response.json()["error"]["param"] == "Idempotency-Key"
    assert count(settings, Dataset) == 1
    assert sorted(p.name for p in settings.datasets_dir.iterdir()) == [f"{first['id']}.jsonl"]


def test_dataset_keys_are_per_owner_and_expire(client, settings) -> None:
    key = {"Idempotency-Key": "upload-1"}
    alices = upload(client, headers=key).json()["id"]
    bobs = upload(client, headers={**key, **bearer(api_key(settings, owner="bob"))}).json()["id"]
    assert alices != bobs
    age_keys(settings, hours=25)
    assert upload(client, headers=key).json()["id"] not in (alices, bobs)
    assert count(settings, Dataset) == 3


def test_without_a_key_the_same_upload_makes_a_new_dataset(client, settings) -> None:
    body = jsonl(arithmetic_rows(2))
    assert upload(client, content=body).json()["id"] != upload(client, content=body).json()["id"]


def test_an_idempotency_key_over_255_characters_is_422(client, dataset_id) -> None:
    response = client.post("/v1/jobs", json=job_spec(dataset_id), headers={"Idempotency-Key": "k" * 256})
    assert response.status_code == 422 and response.json()["error"]["param"] == "idempotency-key"
