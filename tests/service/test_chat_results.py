"""Chat answers are not kept in the result backend: the API deletes each one it reads, and what it
left when its request timed out; an answer stored after that expires. Against the real backends:
the embedded default's directory (``file://``) and Redis (keys under this test's prefix)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis
from celery import Celery, states

from jobs.broker import make_celery
from jobs.chat_queue import wait_for_answer
from jobs.errors import InferenceTimedOut, InferenceUnavailable
from jobs.settings import Settings
from tests.service.conftest import REDIS_URL
from tests.service.factories import forget_broker_keys
from worker.inference import remove_expired_answers

ANSWER = {
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "5"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def file_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, broker_url="filesystem://", inference_timeout_s=0.3)


def redis_settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        broker_url=REDIS_URL,
        broker_key_prefix=f"grpo-test-results-{uuid.uuid4().hex[:8]}:",
        inference_timeout_s=0.3,
    )


@pytest.fixture(params=["file", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Celery, Settings]]:
    """The API's Celery app on one of the backends, as ``make_celery`` configures it."""
    settings = file_settings(tmp_path) if request.param == "file" else redis_settings(tmp_path)
    app = make_celery(settings)
    try:
        yield app, settings
    finally:
        if request.param == "redis":
            forget_broker_keys(settings)


def store(app: Celery, result: object, state: str) -> str:
    """A request's id, and what an inference worker stores for it."""
    task_id = f"chat-{uuid.uuid4().hex}"
    app.backend.store_result(task_id, result, state)
    assert stored(app, task_id)
    return task_id


def stored(app: Celery, task_id: str) -> bool:
    return app.backend.get(app.backend.get_key_for_task(task_id)) is not None


def test_an_answer_the_api_reads_is_deleted(backend) -> None:
    app, settings = backend
    task_id = store(app, ANSWER, states.SUCCESS)
    assert anyio.run(wait_for_answer, app, task_id, settings) == ANSWER
    assert not stored(app, task_id)


def test_a_failed_request_is_deleted_once_read(backend) -> None:
    app, settings = backend
    task_id = store(app, RuntimeError("out of memory"), states.FAILURE)
    with pytest.raises(InferenceUnavailable, match="failed on this request"):
        anyio.run(wait_for_answer, app, task_id, settings)
    assert not stored(app, task_id)


def test_a_request_that_timed_out_is_deleted(backend) -> None:
    app, settings = backend
    task_id = store(app, None, states.STARTED)  # a worker took it and is still generating
    with pytest.raises(InferenceTimedOut, match="did not finish within"):
        anyio.run(wait_for_answer, app, task_id, settings)
    assert not stored(app, task_id)


def test_an_answer_stored_after_its_asker_gave_up_expires_in_redis(tmp_path: Path) -> None:
    settings = redis_settings(tmp_path)
    app = make_celery(settings)
    try:
        task_id = store(app, ANSWER, states.SUCCESS)
        key = app.backend.get_key_for_task(task_id)
        assert key.startswith(settings.broker_key_prefix.encode())
        ttl = redis.Redis.from_url(REDIS_URL).ttl(key)
        assert 0 < ttl <= app.conf.result_expires == max(60, int(2 * settings.inference_timeout_s))
    finally:
        forget_broker_keys(settings)


def test_an_answer_file_nobody_read_is_removed_by_the_inference_worker_once_expired(tmp_path: Path) -> None:
    settings = file_settings(tmp_path)
    app = make_celery(settings)
    unread, recent = store(app, ANSWER, states.SUCCESS), store(app, ANSWER, states.SUCCESS)
    expired = time.time() - app.conf.result_expires - 1
    unread_file = Path(os.fsdecode(app.backend._filename(app.backend.get_key_for_task(unread))))
    os.utime(unread_file, (expired, expired))

    remove_expired_answers(app.backend)  # what the inference worker runs before each request
    assert not stored(app, unread) and stored(app, recent)
    assert [path.name for path in (tmp_path / "results").iterdir()] == [
        app.backend.get_key_for_task(recent).decode()
    ]
