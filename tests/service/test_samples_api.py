"""GET /v1/jobs/{id}/samples: the completions a worker kept, paged, by step, per owner.

The worker's side (that a real job stores them) is checked end to end in test_client.py."""

from __future__ import annotations

import pytest

from jobs.db import transaction
from jobs.queries import add_samples
from jobs.queries.records import MAX_SAMPLE_CHARS, MAX_SAMPLES_PER_STEP
from tests.service.factories import api_key, bearer, job_spec, upload


def sample(step: int, index: int, **overrides) -> dict:
    return {
        "prompt": f"What is {index} + {step}?",
        "completion": f"{index + step}",
        "reward": 1.0 + index,
        "advantage": 0.5 - index,
        "rewards": {"exact_match": 1.0, "regex": None},
        "truncated": False,
        **overrides,
    }


@pytest.fixture
def job_id(client, settings) -> str:
    dataset_id = upload(client).json()["id"]
    job_id = client.post("/v1/jobs", json=job_spec(dataset_id)).json()["id"]
    with transaction(settings.database_url) as session:
        for step in (1, 2, 3):
            add_samples(
                session=session, job_id=job_id, step=step, samples=[sample(step, i) for i in range(2)]
            )
    return job_id


def test_samples_come_in_step_order_a_page_at_a_time(client, job_id) -> None:
    seen, after = [], 0
    while True:
        page = client.get(f"/v1/jobs/{job_id}/samples", params={"limit": 4, "after": after}).json()
        seen += page["data"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert [(s["step"], s["completion"]) for s in seen] == [
        (1, "1"),
        (1, "2"),
        (2, "2"),
        (2, "3"),
        (3, "3"),
        (3, "4"),
    ]
    first = seen[0]
    assert first | {"id": 0, "created_at": ""} == {
        "id": 0,
        "object": "sample",
        "job_id": job_id,
        "step": 1,
        "prompt": "What is 0 + 1?",
        "completion": "1",
        "reward": 1.0,
        "advantage": 0.5,
        "rewards": {"exact_match": 1.0, "regex": None},
        "truncated": False,
        "created_at": "",
    }


def test_one_steps_samples(client, job_id) -> None:
    page = client.get(f"/v1/jobs/{job_id}/samples", params={"step": 2}).json()
    assert [s["step"] for s in page["data"]] == [2, 2] and page["has_more"] is False
    assert client.get(f"/v1/jobs/{job_id}/samples", params={"step": 9}).json()["data"] == []
    assert client.get(f"/v1/jobs/{job_id}/samples", params={"step": 0}).json()["error"]["param"] == "step"


def test_a_replayed_step_replaces_its_samples_and_a_step_keeps_a_bounded_few(
    client, settings, job_id
) -> None:
    many = [sample(2, i, completion="x" * (MAX_SAMPLE_CHARS + 10)) for i in range(MAX_SAMPLES_PER_STEP + 5)]
    with transaction(settings.database_url) as session:
        add_samples(session=session, job_id=job_id, step=2, samples=many)
    kept = client.get(f"/v1/jobs/{job_id}/samples", params={"step": 2, "limit": 100}).json()["data"]
    assert len(kept) == MAX_SAMPLES_PER_STEP
    assert all(
        len(s["completion"]) < MAX_SAMPLE_CHARS + 10 and s["completion"].endswith("[...]") for s in kept
    )


def test_another_owners_job_has_no_samples_to_show(client, settings, job_id) -> None:
    response = client.get(f"/v1/jobs/{job_id}/samples", headers=bearer(api_key(settings, owner="bob")))
    assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
    assert client.get("/v1/jobs/job_nope/samples").status_code == 404
