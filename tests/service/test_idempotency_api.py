"""Idempotency-Key on POST /v1/jobs and POST /v1/datasets, on PostgreSQL: the same key and body
within 24 h return the original, another body is a 409, keys are per owner and expire."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from jobs.db import transaction
from jobs.models import Dataset, IdempotencyKey, Job, utcnow
from tests.service.factories import api_key, arithmetic_rows, bearer, job_spec, jsonl, upload


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
    assert count(settings, Job) == 1 and sent == list(made)


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
