"""Job webhooks end to end: a receiver on loopback (which the operator's settings allow), the API,
PostgreSQL, Redis and a real worker whose sweeper makes the retries. Every delivery's signature is
checked here by recomputing the HMAC, not with the service's own code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import update

from api.main import create_app
from jobs.db import session_factory, transaction
from jobs.migrate import upgrade
from jobs.models import Job, since
from jobs.queries import claim_webhook_attempt, create_dataset, create_job, list_due_webhooks, request_cancel
from jobs.settings import Settings
from jobs.webhooks import deliver_webhook, signature
from tests.service.e2e import wait_until_ended
from tests.service.factories import api_key, bearer, free_port, job_spec, stored_job_spec, upload, wait_for
from tests.service.http_stub import LoopbackEndpoint

pytestmark = pytest.mark.slow

KEY = b"a key of the operator's, 32 byte"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
SETTLE_S = 2.5  # two sweeps of the module's worker (sweep_interval_s=1): time for a duplicate to show up


@dataclass
class Post:
    headers: dict[str, str]  # names in lower case
    body: bytes


class Receiver(LoopbackEndpoint):
    """A webhook receiver on loopback; ``status(call)`` answers the ``call``-th POST (1-based)."""

    path = "/hooks/grpo"

    def __init__(self, status: Callable[[int], int] = lambda call: 200):
        self.posts: list[Post] = []
        self.status = status
        self.lock = threading.Lock()
        super().__init__()

    def answer(self, request: BaseHTTPRequestHandler, body: bytes) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.posts.append(Post({k.lower(): v for k, v in request.headers.items()}, body))
            call = len(self.posts)
        return self.status(call), {}


def verified(post: Post, job_id: str) -> dict[str, Any]:
    """The body of a delivery whose Standard Webhooks signature checks out with the shared secret."""
    message_id, timestamp = post.headers["webhook-id"], post.headers["webhook-timestamp"]
    assert message_id == f"msg_{job_id}" and abs(time.time() - int(timestamp)) < 300
    expected = base64.b64encode(
        hmac.new(KEY, f"{message_id}.{timestamp}.".encode() + post.body, hashlib.sha256).digest()
    ).decode()
    assert post.headers["webhook-signature"] == f"v1,{expected}"
    assert post.headers["content-type"] == "application/json"
    return json.loads(post.body)


def webhook_events(client: TestClient, job_id: str) -> list[str]:
    events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return [event["message"] for event in events if event["kind"] == "webhook"]


def wait_for_webhook(client: TestClient, job_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["webhook_status"] == status else None

    return wait_for(reached, timeout=timeout, what=f"job {job_id}'s webhook to be {status}", interval=0.1)


@pytest.fixture(scope="module")
def redis_worker_settings(redis_worker_settings: Settings) -> Settings:
    """The e2e settings (loopback allowed), with a webhook secret and retries a second apart, not
    minutes; and a queued job never sent stays unsent for a minute (the cancel tests need it queued)."""
    return redis_worker_settings.model_copy(
        update={
            "webhook_secret": SecretStr(SECRET),
            "webhook_backoff_s": 0.3,
            "webhook_max_attempts": 3,
            "webhook_timeout_s": 5.0,
            "send_grace_s": 60,
        }
    )


@pytest.fixture(scope="module")
def worker_client(redis_worker_settings, redis_worker) -> Iterator[TestClient]:
    """The API, sending jobs to the module's worker through Redis."""
    settings = redis_worker_settings
    with TestClient(create_app(settings), headers=bearer(api_key(settings))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def unsent_client(redis_worker_settings, redis_worker) -> Iterator[TestClient]:
    """The same API and database, but its jobs are never sent to a worker: they stay queued."""
    settings = redis_worker_settings
    with TestClient(
        create_app(settings, send=lambda job_id: None), headers=bearer(api_key(settings))
    ) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def dataset_id(worker_client) -> str:
    return upload(worker_client).json()["id"]


def test_the_signature_matches_the_standard_webhooks_test_vector() -> None:
    assert (
        signature(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            b'{"test": 2432232314}',
        )
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_a_job_that_succeeds_posts_one_signed_webhook(
    worker_client, redis_worker, dataset_id, tiny_model
) -> None:
    with Receiver() as receiver:
        spec = job_spec(
            dataset_id,
            str(tiny_model),
            webhook_url=receiver.url,
            hyperparameters={"max_steps": 1, "checkpoint_every": 0},
        )
        job_id = worker_client.post("/v1/jobs", json=spec).json()["id"]
        job = wait_until_ended(worker_client, job_id)
        assert job["status"] == "succeeded", (job, redis_worker.log()[-3000:])
        wait_for_webhook(worker_client, job_id, "delivered")
        time.sleep(SETTLE_S)
        (post,) = receiver.posts
    body = verified(post, job_id)
    assert body["type"] == "job.succeeded" and body["timestamp"] == body["job"]["finished_at"]
    shown = body["job"]
    assert (shown["id"], shown["status"], shown["step"], shown["max_steps"], shown["failure_reason"]) == (
        job_id,
        "succeeded",
        1,
        1,
        None,
    )
    assert shown["webhook_url"] == receiver.url and "reward" in shown["latest_metrics"]
    assert webhook_events(worker_client, job_id) == ["webhook delivered (attempt 1, HTTP 200)"]


def test_a_job_cancelled_while_queued_posts_one_signed_webhook(
    unsent_client, redis_worker, dataset_id
) -> None:
    with Receiver() as receiver:
        job_id = unsent_client.post("/v1/jobs", json=job_spec(dataset_id, webhook_url=receiver.url)).json()[
            "id"
        ]
        cancelled = unsent_client.post(f"/v1/jobs/{job_id}/cancel").json()
        # The answer is sent before the first attempt is made (by the API, right after).
        assert (cancelled["status"], cancelled["webhook_status"]) == ("cancelled", "pending")
        wait_for_webhook(unsent_client, job_id, "delivered")
        time.sleep(SETTLE_S)  # the worker's sweeper does not deliver it again
        (post,) = receiver.posts
    body = verified(post, job_id)
    assert body["type"] == "job.cancelled"
    assert (body["job"]["id"], body["job"]["status"], body["job"]["step"]) == (job_id, "cancelled", 0)
    assert webhook_events(unsent_client, job_id) == ["webhook delivered (attempt 1, HTTP 200)"]


def test_a_receiver_failing_twice_gets_the_webhook_on_the_third_attempt(
    unsent_client, redis_worker, dataset_id
) -> None:
    with Receiver(lambda call: 500 if call <= 2 else 200) as receiver:
        job_id = unsent_client.post("/v1/jobs", json=job_spec(dataset_id, webhook_url=receiver.url)).json()[
            "id"
        ]
        unsent_client.post(
            f"/v1/jobs/{job_id}/cancel"
        )  # attempt 1 by the API; 2 and 3 by the worker's sweeper
        wait_for_webhook(unsent_client, job_id, "delivered")
        time.sleep(SETTLE_S)
        posts = list(receiver.posts)
    assert len(posts) == 3
    assert [verified(post, job_id)["type"] for post in posts] == [
        "job.cancelled"
    ] * 3  # one message id, re-signed
    first, second, delivered = webhook_events(unsent_client, job_id)
    assert first.startswith(f"webhook attempt 1 failed: POST {receiver.url}: answered HTTP 500")
    assert first.endswith(", retrying in 0.3s") and second.endswith(", retrying in 0.6s")
    assert second.startswith("webhook attempt 2 failed: ")
    assert delivered == "webhook delivered (attempt 3, HTTP 200)"


def test_a_receiver_down_for_good_is_given_up_after_the_last_attempt(
    unsent_client, redis_worker, dataset_id
) -> None:
    url = f"http://127.0.0.1:{free_port()}/hooks/grpo"  # nothing listens there
    job_id = unsent_client.post("/v1/jobs", json=job_spec(dataset_id, webhook_url=url)).json()["id"]
    unsent_client.post(f"/v1/jobs/{job_id}/cancel")
    job = wait_for_webhook(unsent_client, job_id, "failed")
    assert job["status"] == "cancelled"
    messages = webhook_events(unsent_client, job_id)
    assert [message.split(":")[0] for message in messages] == [
        "webhook attempt 1 failed",
        "webhook attempt 2 failed",
        "webhook given up after 3 attempts",
    ]
    assert all("cannot connect" in message for message in messages)
    time.sleep(SETTLE_S)
    assert len(webhook_events(unsent_client, job_id)) == 3  # no fourth attempt


def test_a_delivery_whose_attempts_died_with_their_process_is_made_by_a_sweeper(
    unsent_client, redis_worker_settings, redis_worker, dataset_id
) -> None:
    with Receiver() as receiver:
        job_id = unsent_client.post("/v1/jobs", json=job_spec(dataset_id, webhook_url=receiver.url)).json()[
            "id"
        ]
        with transaction(redis_worker_settings.database_url) as session:
            # The job ends and its process dies before its first attempt ...
            request_cancel(session=session, owner="alice", job_id=job_id)  # api_key()'s owner
        with transaction(redis_worker_settings.database_url) as session:
            # ... and the sweeper that took attempt 1 dies during it, its claim running out in 1 s.
            assert claim_webhook_attempt(session=session, job_id=job_id, deadline_s=1) is not None
        wait_for_webhook(unsent_client, job_id, "delivered", timeout=20)
        time.sleep(SETTLE_S)
        (post,) = receiver.posts
    assert verified(post, job_id)["type"] == "job.cancelled"
    assert webhook_events(unsent_client, job_id) == ["webhook delivered (attempt 2, HTTP 200)"]


# API only (the conftest's client: no worker, no broker)


def test_webhooks_need_the_operators_secret(client) -> None:
    dataset_id = upload(client).json()["id"]
    response = client.post(
        "/v1/jobs", json=job_spec(dataset_id, webhook_url="https://hooks.example.com/grpo")
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "webhook_url" and "GRPO_WEBHOOK_SECRET" in error["message"]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://10.0.0.1/hooks", "10.0.0.1 is a private address"),
        ("http://127.0.0.1:8000/hooks", "127.0.0.1 is a loopback address"),
        ("http://[::ffff:169.254.169.254]/latest/meta-data", "a link-local address"),
        ("http://2130706433/hooks", "a loopback address"),
    ],
)
def test_a_private_webhook_url_is_refused_at_creation_unless_the_operator_allows_it(
    client, settings, url, says
) -> None:
    settings.webhook_secret = SecretStr(SECRET)
    dataset_id = upload(client).json()["id"]
    response = client.post("/v1/jobs", json=job_spec(dataset_id, webhook_url=url))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "webhook_url" and says in error["message"]
    assert "GRPO_ALLOW_PRIVATE_HOSTS" in error["message"]
    settings.allow_private_hosts = ["10.0.0.1", "127.0.0.1", "::ffff:169.254.169.254"]
    assert client.post("/v1/jobs", json=job_spec(dataset_id, webhook_url=url)).status_code == 201


def test_a_name_that_resolves_to_a_private_address_is_refused_at_delivery(client, settings) -> None:
    settings.webhook_secret = SecretStr(SECRET)
    dataset_id = upload(client).json()["id"]
    with Receiver() as receiver:
        url = receiver.url.replace(
            "127.0.0.1", "localhost"
        )  # a name passes creation; each delivery checks it
        job_id = client.post("/v1/jobs", json=job_spec(dataset_id, webhook_url=url)).json()["id"]
        client.post(f"/v1/jobs/{job_id}/cancel")  # the API's attempt runs before the test client returns
        assert client.get(f"/v1/jobs/{job_id}").json()["webhook_status"] == "failed"
        assert receiver.posts == []
    (message,) = webhook_events(client, job_id)
    assert message.startswith(
        f"webhook given up after 1 attempt: refusing to call {url}: localhost (resolved to "
    )
    assert "a loopback address" in message and "GRPO_ALLOW_PRIVATE_HOSTS" in message


def test_a_job_without_a_webhook_has_no_delivery(client) -> None:
    dataset_id = upload(client).json()["id"]
    job_id = client.post("/v1/jobs", json=job_spec(dataset_id)).json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["webhook_status"] is None
    assert webhook_events(client, job_id) == []


def test_deliveries_work_on_the_embedded_sqlite_database(tmp_path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        allow_private_hosts=["127.0.0.1"],
        webhook_secret=SecretStr(SECRET),
        webhook_backoff_s=60,
        webhook_max_attempts=2,
    )
    upgrade(settings.database_url)
    sessions = session_factory(settings.database_url)
    with Receiver(lambda call: 503 if call == 1 else 204) as receiver:
        with transaction(settings.database_url) as session:
            create_dataset(
                session=session,
                owner="local",
                name="d",
                rows=1,
                bytes=1,
                sha256="x",
                fields=["prompt"],
                dataset_id="ds_1",
            )
            spec = stored_job_spec(
                {
                    "base_model": "org/model",
                    "dataset_id": "ds_1",
                    "webhook_url": receiver.url,
                    "reward": [{"type": "exact_match"}],
                    "group_size": 2,
                    "hyperparameters": {"max_steps": 1},
                }
            )
            job_id = create_job(session=session, owner="local", spec=spec).id
            request_cancel(session=session, owner="local", job_id=job_id)
        assert (
            deliver_webhook(job_id, sessions=sessions, settings=settings) == "pending"
        )  # 503: again in 60 s
        with transaction(settings.database_url) as session:
            assert list_due_webhooks(session=session) == []
        assert deliver_webhook(job_id, sessions=sessions, settings=settings) is None  # not due yet
        with transaction(settings.database_url) as session:  # a minute later
            session.execute(update(Job).where(Job.id == job_id).values(webhook_due_at=since(1)))
            assert list_due_webhooks(session=session) == [job_id]
        assert deliver_webhook(job_id, sessions=sessions, settings=settings) == "delivered"
        assert [verified(post, job_id)["type"] for post in receiver.posts] == ["job.cancelled"] * 2


def test_the_openai_cancel_of_a_queued_job_makes_the_first_attempt_itself(settings, sent) -> None:
    # No worker here (so no sweeper): the one POST can only come from the API's own first attempt.
    settings = settings.model_copy(
        update={"webhook_secret": SecretStr(SECRET), "allow_private_hosts": ["127.0.0.1"]}
    )
    with (
        TestClient(create_app(settings, send=sent.append), headers=bearer(api_key(settings))) as client,
        Receiver() as receiver,
    ):
        dataset_id = upload(client).json()["id"]
        job_id = client.post("/v1/jobs", json=job_spec(dataset_id, webhook_url=receiver.url)).json()["id"]
        assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        wait_for_webhook(client, job_id, "delivered", timeout=15)
        (post,) = receiver.posts
    assert verified(post, job_id)["type"] == "job.cancelled"
