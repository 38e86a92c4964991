"""A chat request's round trip to the inference workers over Celery: send it on the inference
queue, wait for the answer in the result backend, within GRPO_INFERENCE_TIMEOUT_S.

The result backend is the broker's Redis, or with the filesystem broker a directory
(``file://``). The API polls it (a GET every few tens of milliseconds, growing to a quarter
second) rather than call ``AsyncResult.get``: Celery's Redis backend would subscribe a pub/sub
channel per request on one connection that all the API's threads share, which redis-py's pub/sub
does not allow (celery/celery#3761, #4670), and whose unread messages pile up.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from celery import Celery, states
from celery.backends.redis import RedisBackend

from jobs.chat import CHAT_COMPLETION
from jobs.errors import InferenceTimedOut, InferenceUnavailable
from jobs.settings import Settings

log = logging.getLogger(__name__)

FIRST_POLL_S, LAST_POLL_S = 0.02, 0.25


class PolledRedisBackend(RedisBackend):
    """Celery's Redis result backend without its pub/sub: results are read with GET."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        pass  # no subscription per sent task

    def on_result_fulfilled(self, result: Any) -> None:
        pass  # nothing subscribed, nothing to cancel


def result_backend_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings of the result backend that chat answers come back through."""
    url = settings.result_backend
    config: dict[str, Any] = {
        # An answer is read and deleted as soon as it is stored (``forget``); one stored after its
        # asker gave up goes after this long: Redis expires the key, and the inference worker
        # deletes such files before each request (``worker.inference.remove_expired_answers``).
        "result_expires": max(60, int(2 * settings.inference_timeout_s)),
        "result_serializer": "json",
        "result_accept_content": ["json"],
    }
    if url.startswith(("redis://", "rediss://")):
        url = f"{__name__}:PolledRedisBackend+{url}"
        if settings.broker_key_prefix:
            config["result_backend_transport_options"] = {"global_keyprefix": settings.broker_key_prefix}
    elif url.startswith("file://"):
        Path(url[len("file://") :]).mkdir(parents=True, exist_ok=True)  # the backend checks it exists
    return {**config, "result_backend": url}


def send_chat(app: Celery, request: dict[str, Any], settings: Settings) -> str:
    """Put ``request`` on the inference queue; returns the task id to wait on. The message
    expires with the wait: a worker that takes it later drops it unanswered."""
    task_id = f"chat-{uuid.uuid4().hex}"
    try:
        app.send_task(
            CHAT_COMPLETION,
            kwargs={"request": request},
            queue=settings.inference_queue,
            task_id=task_id,
            expires=settings.inference_timeout_s,
        )
    except Exception as exc:
        log.warning("could not send chat request %s to the broker", task_id, exc_info=True)
        raise InferenceUnavailable(
            "the inference queue cannot be reached right now; try again in a moment"
        ) from exc
    return task_id


async def wait_for_answer(app: Celery, task_id: str, settings: Settings) -> dict[str, Any]:
    """The inference worker's answer to ``task_id``; ``InferenceTimedOut`` past the timeout,
    ``InferenceUnavailable`` if the worker failed on it or the backend cannot be read."""
    backend = app.backend
    deadline = anyio.current_time() + settings.inference_timeout_s
    delay = FIRST_POLL_S
    while True:
        try:
            meta = await anyio.to_thread.run_sync(lambda: backend.get_task_meta(task_id, cache=False))
        except Exception as exc:
            log.warning("could not read the answer to chat request %s", task_id, exc_info=True)
            raise InferenceUnavailable(
                "the answer could not be read from the result backend; try again"
            ) from exc
        state = meta.get("status")
        if state in states.READY_STATES:
            await anyio.to_thread.run_sync(forget, backend, task_id)
            if state == states.SUCCESS and isinstance(meta.get("result"), dict):
                return meta["result"]
            log.error("chat request %s ended %s in the inference worker", task_id, state)
            raise InferenceUnavailable(
                "the inference worker failed on this request; try again, and if it fails the "
                f"same way give the operator its id ({task_id}), whose worker log has why"
            )
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            await anyio.to_thread.run_sync(forget, backend, task_id)  # e.g. its STARTED state
            raise timed_out(state, settings, task_id)
        await anyio.sleep(min(delay, remaining))
        delay = min(delay * 1.5, LAST_POLL_S)


def forget(backend: Any, task_id: str) -> None:
    """Delete what the backend holds for ``task_id`` (a file, or a Redis key). Not the backend's
    own ``forget``: the Redis one would unsubscribe a channel that ``PolledRedisBackend`` never
    subscribed."""
    try:
        backend.delete(backend.get_key_for_task(task_id))
    except FileNotFoundError:  # the file backend, before anything was stored
        pass
    except Exception:  # expiry removes it anyway
        log.debug("could not delete the answer to %s", task_id, exc_info=True)


def timed_out(state: str | None, settings: Settings, task_id: str) -> InferenceTimedOut:
    waited = f"{settings.inference_timeout_s:g} s (GRPO_INFERENCE_TIMEOUT_S)"
    if state == states.STARTED:
        return InferenceTimedOut(
            f"the inference worker did not finish within {waited}; ask for fewer tokens "
            "(max_tokens) or choices (n), or try again when it is less busy"
        )
    return InferenceTimedOut(
        f"no inference worker took the request within {waited}: none may be running "
        "(start one with `grpo worker --inference`; in compose, the inference service), "
        f"or all are busy; try again (request {task_id})"
    )
