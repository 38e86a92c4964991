"""API keys and tenants on PostgreSQL: no key, a bad key or a revoked key is a 401; another
owner's dataset or job is a 404 exactly like a missing one, on every route; rate limits."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.keycache import KeyCache
from api.main import create_app
from api.ratelimit import RateLimiter
from jobs.db import transaction
from jobs.models import ApiKey, Dataset, Job, new_id
from jobs.queries import revoke_api_key
from tests.service.factories import api_key, bearer, job_spec, make_checkpoint, upload

OPEN = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")


def v1_routes(client: TestClient) -> list[tuple[str, str]]:
    """(method, path template) of every /v1 route in the OpenAPI document, including ones added
    after this test was written."""
    paths = client.get("/openapi.json").json()["paths"]
    return sorted(
        (method.upper(), path)
        for path, operations in paths.items()
        if path.startswith("/v1/")
        for method in operations
    )


def fill(path: str, **ids: str | int) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(ids[m.group(1)]), path)


@pytest.fixture
def alice(client, settings) -> dict[str, str | int]:
    """alice's dataset, and her queued job with a checkpoint at step 2."""
    dataset_id = upload(client).json()["id"]
    job_id = client.post("/v1/jobs", json=job_spec(dataset_id)).json()["id"]
    make_checkpoint(settings, job_id, 2)
    return {
        "dataset_id": dataset_id,
        "file_id": dataset_id,
        "job_id": job_id,
        "step": 2,
    }  # a file is a dataset


@pytest.fixture
def bob(settings) -> dict[str, str]:
    return bearer(api_key(settings, owner="bob"))


def test_every_v1_route_needs_a_key_and_says_how_to_send_one(client, alice) -> None:
    routes = v1_routes(client)
    assert len(routes) >= 11
    for method, path in routes:
        response = client.request(method, fill(path, **alice), headers={"Authorization": ""})
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="grpo"'
        error = response.json()["error"]
        assert error["code"] == "unauthorized" and "Authorization: Bearer" in error["message"]


@pytest.mark.parametrize(
    ("authorization", "says"),
    [
        ("", "no API key"),
        ("Bearer", "no API key"),
        ("Basic YWxpY2U6c2VjcmV0", "no API key"),
        ("Bearer grpo_not-a-real-key", "invalid API key"),
        ("bearer grpo_not-a-real-key", "invalid API key"),
    ],
)
def test_missing_or_invalid_keys_are_401(client, authorization, says) -> None:
    response = client.get("/v1/jobs", headers={"Authorization": authorization})
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert says in response.json()["error"]["message"]


def _revoke_bobs_key(settings) -> None:
    with transaction(settings.database_url) as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.owner == "bob"))
        revoke_api_key(session=session, key_id=key_id)


def test_a_revoked_key_is_401_at_once_without_a_key_cache(client, settings) -> None:
    client.app.state.key_cache = KeyCache(0)  # GRPO_API_KEY_CACHE_S=0
    secret = api_key(settings, owner="bob")
    assert client.get("/v1/jobs", headers=bearer(secret)).status_code == 200
    _revoke_bobs_key(settings)
    response = client.get("/v1/jobs", headers=bearer(secret))
    assert response.status_code == 401 and "revoked" in response.json()["error"]["message"]


def test_a_revoked_key_is_401_once_the_key_cache_forgets_it(client, settings) -> None:
    now = [0.0]
    client.app.state.key_cache = KeyCache(10, clock=lambda: now[0])
    secret, unknown = api_key(settings, owner="bob"), "grpo_not-a-real-key"
    assert client.get("/v1/jobs", headers=bearer(unknown)).status_code == 401  # failures are not cached
    assert client.get("/v1/jobs", headers=bearer(secret)).status_code == 200
    _revoke_bobs_key(settings)
    now[0] = 9.5
    assert client.get("/v1/jobs", headers=bearer(secret)).status_code == 200  # still trusted by this process
    now[0] = 10.5
    response = client.get("/v1/jobs", headers=bearer(secret))
    assert response.status_code == 401 and "revoked" in response.json()["error"]["message"]
    assert client.get("/v1/jobs", headers=bearer(unknown)).status_code == 401


def test_health_metrics_and_docs_stay_open(settings, sent) -> None:
    with TestClient(create_app(settings, send=sent.append)) as anonymous:
        for path in OPEN:
            assert anonymous.get(path).status_code == 200, path


def test_another_owner_s_resources_are_404_like_missing_ones_on_every_route(
    client, settings, alice, bob
) -> None:
    missing_dataset = new_id("ds")
    missing = {"dataset_id": missing_dataset, "file_id": missing_dataset, "job_id": new_id("job"), "step": 2}
    tried = set()
    for method, path in v1_routes(client):
        if "{" not in path:
            continue
        for accept in (
            ("application/json", "text/event-stream") if path.endswith("/events") else ("application/json",)
        ):
            headers = {**bob, "accept": accept}
            theirs = client.request(method, fill(path, **alice), headers=headers)
            nothing = client.request(method, fill(path, **missing), headers=headers)
            assert theirs.status_code == nothing.status_code == 404, (method, path, theirs.text)
            as_if_missing = json.loads(
                json.dumps(theirs.json())
                .replace(str(alice["job_id"]), missing["job_id"])
                .replace(str(alice["dataset_id"]), missing["dataset_id"])
            )
            assert as_if_missing == nothing.json(), (method, path)
            tried.add(f"{method} {path}")
    assert {
        "GET /v1/datasets/{dataset_id}",
        "GET /v1/jobs/{job_id}",
        "POST /v1/jobs/{job_id}/cancel",
        "GET /v1/jobs/{job_id}/metrics",
        "GET /v1/jobs/{job_id}/events",
        "GET /v1/jobs/{job_id}/checkpoints",
        "GET /v1/jobs/{job_id}/checkpoints/{step}/download",
        "GET /v1/files/{file_id}",
        "GET /v1/fine_tuning/jobs/{job_id}",
        "POST /v1/fine_tuning/jobs/{job_id}/cancel",
    } <= tried

    # nothing bob did reached alice's job, and she still sees all of it
    job = client.get(f"/v1/jobs/{alice['job_id']}").json()
    assert (job["status"], job["cancel_requested"], job.get("pause_requested", False)) == (
        "queued",
        False,
        False,
    )
    assert client.get(f"/v1/jobs/{alice['job_id']}/checkpoints/2/download").status_code == 200


def test_lists_show_only_the_owner_s_own(client, alice, bob) -> None:
    assert client.get("/v1/datasets", headers=bob).json() == {"data": [], "has_more": False}
    for query in ("", "?status=queued", f"?after={new_id('job')}"):
        assert client.get(f"/v1/jobs{query}", headers=bob).json() == {"data": [], "has_more": False}
    bobs = upload(client, headers=bob).json()["id"]
    assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [alice["dataset_id"]]
    assert [d["id"] for d in client.get("/v1/datasets", headers=bob).json()["data"]] == [bobs]


@pytest.mark.parametrize("field", ["dataset_id", "eval_dataset_id"])
def test_a_job_cannot_use_another_owner_s_dataset(client, settings, alice, bob, field) -> None:
    bobs = upload(client, headers=bob).json()["id"]
    spec = {**job_spec(bobs), field: alice["dataset_id"]}
    response = client.post("/v1/jobs", json=spec, headers=bob)
    assert response.status_code == 404
    assert response.json()["error"] == {
        "code": "dataset_not_found",
        "param": field,
        "message": f"no dataset with id {alice['dataset_id']!r}; upload one with POST /v1/datasets",
    }


def test_what_a_key_creates_belongs_to_its_owner(client, settings, alice, bob) -> None:
    bobs_dataset = upload(client, headers=bob).json()["id"]
    bobs_job = client.post("/v1/jobs", json=job_spec(bobs_dataset), headers=bob).json()["id"]
    with transaction(settings.database_url) as session:
        assert session.get(Dataset, bobs_dataset).owner == "bob" and session.get(Job, bobs_job).owner == "bob"
        assert session.get(Job, alice["job_id"]).owner == "alice"


def test_with_auth_disabled_everything_belongs_to_the_local_owner(settings, sent) -> None:
    settings.auth = "disabled"
    with TestClient(create_app(settings, send=sent.append)) as anonymous:
        dataset_id = upload(anonymous).json()["id"]
        job = anonymous.post("/v1/jobs", json=job_spec(dataset_id))
        assert job.status_code == 201
        ignored = anonymous.get("/v1/jobs", headers=bearer("grpo_whatever")).json()["data"]
        assert [j["id"] for j in ignored] == [job.json()["id"]]
    with transaction(settings.database_url) as session:
        assert session.get(Job, job.json()["id"]).owner == "local"


def test_rate_limit_is_per_key_with_retry_after(settings, sent, bob) -> None:
    settings.rate_limit_per_s, settings.rate_limit_burst = 0.5, 2
    with TestClient(create_app(settings, send=sent.append), headers=bearer(api_key(settings))) as client:
        assert [client.get("/v1/jobs").status_code for _ in range(2)] == [200, 200]
        limited = client.get("/v1/jobs")
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "2"
        assert limited.json()["error"]["code"] == "rate_limited"
        assert client.get("/v1/jobs", headers=bob).status_code == 200  # bob has his own bucket
        assert client.get("/healthz").status_code == 200  # open routes are not limited


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2, burst=3, clock=lambda: now[0])
    assert [limiter.take("k") for _ in range(3)] == [0, 0, 0]
    assert limiter.take("k") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.take("k") == 0 and limiter.take("k") == pytest.approx(0.5)
    now[0] += 100
    assert [limiter.take("k") for _ in range(4)][-1] > 0  # never more than the burst
    assert RateLimiter(rate_per_s=0, burst=1).take("k") == 0  # off
