"""Job webhooks: a job's ``webhook_url`` is POSTed once the job ends (succeeded, failed, cancelled).

The delivery lives in the job's row (``jobs.queries.webhooks``): it becomes due in the very
transaction that ends the job, whichever process ends it (a worker, the API cancelling a queued
job, a sweeper failing a job that lost its workers), and stays due until an attempt succeeds or
``GRPO_WEBHOOK_MAX_ATTEMPTS`` have failed. That process makes the first attempt right after its
commit; every worker's webhook deliverer (a thread beside its sweeper, ``worker.webhooks``) makes
the attempts that are due (retries after a backoff, and any attempt a crash or restart
interrupted). Each attempt is an event of the job's (kind ``webhook``).
Delivery is at least once: a receiver that answered but whose answer was lost gets the message
again, with the same ``webhook-id``.

Requests are signed as Standard Webhooks (https://www.standardwebhooks.com) sign them:

    webhook-id: msg_<job id>                      (the same on every attempt: deduplicate by it)
    webhook-timestamp: <seconds since the epoch>  (of this attempt: refuse old ones)
    webhook-signature: v1,<base64 of HMAC-SHA256(key, "<id>.<timestamp>.<body>")>

where the key is the base64-decoded part of a ``whsec_...`` ``GRPO_WEBHOOK_SECRET``, or the
UTF-8 bytes of any other secret. The body is ``{"type": "job.<status>", "timestamp": <when the
job ended>, "job": <the job, as GET /v1/jobs/{id} shows it>}``. Calls go through
``trainer.net`` (no private addresses unless the operator lists them, a timeout, no redirects).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from jobs.db import unit_of_work
from jobs.models import Job, WebhookStatus, utcnow
from jobs.queries import claim_webhook_attempt, list_due_webhooks, record_webhook_attempt
from jobs.schemas import JobOut
from jobs.settings import Settings
from trainer.net import OutboundError, RefusedUrl, post_json

log = logging.getLogger(__name__)
WEBHOOK_ANSWER_BYTES = 64 * 1024  # what a receiver's answer may hold: only its status is read

SECRET_PREFIX = "whsec_"
DELIVERERS = 4  # a worker's attempts at once: one slow receiver does not hold up the others
CLAIM_MARGIN_S = 30.0  # beyond the request's own timeouts, before an unfinished attempt is made again


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret: a Standard Webhooks ``whsec_<base64>`` secret's decoded bytes,
    else the secret's UTF-8 bytes."""
    if secret.startswith(SECRET_PREFIX):
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    return secret.encode()


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{message_id}.{timestamp}.{body}">``."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(signing_key(secret), signed, hashlib.sha256).digest()).decode()


def signed_headers(secret: str, message_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, message_id, timestamp, body),
    }


def message_id(job_id: str) -> str:
    return f"msg_{job_id}"


def webhook_body(job: Job, latest_metrics: dict[str, Any] | None) -> bytes:
    shown = JobOut.from_job(job, latest_metrics).model_dump(mode="json", exclude={"webhook_status"})
    payload = {"type": f"job.{job.status}", "timestamp": shown["finished_at"], "job": shown}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def retry_delay_s(settings: Settings, attempt: int) -> float:
    """The wait after failed attempt ``attempt`` (1-based): doubling from GRPO_WEBHOOK_BACKOFF_S."""
    return min(settings.webhook_max_backoff_s, settings.webhook_backoff_s * 2 ** (attempt - 1))


def deliver_webhook(
    job_id: str, *, sessions: sessionmaker[Session], settings: Settings
) -> WebhookStatus | None:
    """Make the job's webhook attempt if one is due and no one else is making it; where the
    delivery stands afterwards (None: no attempt was due, or a later one took over)."""
    deadline_s = 2 * settings.webhook_timeout_s + CLAIM_MARGIN_S  # connect, then read
    with unit_of_work(sessions) as session:
        claimed = claim_webhook_attempt(session=session, job_id=job_id, deadline_s=deadline_s)
        if claimed is None:
            return None
        job, metrics = claimed
        attempt, url, body = job.webhook_attempts, job.webhook_url, webhook_body(job, metrics)
    assert url is not None

    give_up = attempt >= settings.webhook_max_attempts
    answer = None
    if settings.webhook_secret is None:
        reason = "this server has no GRPO_WEBHOOK_SECRET to sign it with"
    else:
        headers = signed_headers(settings.webhook_secret.get_secret_value(), message_id(job_id), body)
        try:
            answer = post_json(
                url,
                body,
                allowed_hosts=settings.allow_private_hosts,
                retries=0,
                timeout_s=settings.webhook_timeout_s,
                headers=headers,
                max_answer_bytes=WEBHOOK_ANSWER_BYTES,
            ).status_code
            reason = ""
        except RefusedUrl as exc:  # a name that resolves to a private address: asking again will not help
            reason, give_up = str(exc), True
        except OutboundError as exc:
            reason = str(exc)

    retry_at, level, data = (
        None,
        "info",
        ({"http_status": answer} if answer is not None else {"error": reason}),
    )
    if answer is not None:
        status, message = WebhookStatus.delivered, f"webhook delivered (attempt {attempt}, HTTP {answer})"
    elif give_up:
        status, level = WebhookStatus.failed, "error"
        message = f"webhook given up after {attempt} attempt{'s' if attempt != 1 else ''}: {reason}"
    else:
        delay = retry_delay_s(settings, attempt)
        status, level, retry_at = WebhookStatus.pending, "warning", utcnow() + timedelta(seconds=delay)
        message = f"webhook attempt {attempt} failed: {reason}, retrying in {delay:g}s"
    with unit_of_work(sessions) as session:
        recorded = record_webhook_attempt(
            session=session,
            job_id=job_id,
            attempt=attempt,
            status=status,
            message=message,
            retry_at=retry_at,
            level=level,
            data=data,
        )
    log.info(
        "job %s: %s", job_id, message if recorded else f"webhook attempt {attempt} overtaken by a later one"
    )
    return status if recorded else None


def first_attempt(job_id: str, *, sessions: sessionmaker[Session], settings: Settings) -> None:
    """The attempt the process that ended a job makes right after committing; if it cannot run
    (the database, say), the delivery stays due and a worker's deliverer makes it."""
    try:
        deliver_webhook(job_id, sessions=sessions, settings=settings)
    except Exception:
        log.exception(
            "job %s: the first webhook attempt failed to run; a worker's deliverer makes it", job_id
        )


def deliver_due_webhooks(*, sessions: sessionmaker[Session], settings: Settings, limit: int = 16) -> int:
    """Make the webhook attempts that are due (at most ``limit``, a few at a time); how many there were."""
    with unit_of_work(sessions) as session:
        due = list_due_webhooks(session=session, limit=limit)
    if not due:
        return 0
    with ThreadPoolExecutor(max_workers=min(DELIVERERS, len(due)), thread_name_prefix="webhook") as pool:
        for job_id, future in [
            (job_id, pool.submit(deliver_webhook, job_id, sessions=sessions, settings=settings))
            for job_id in due
        ]:
            try:
                future.result()
            except Exception:  # the database, say: the attempt stays due, and the next pass makes it
                log.exception("job %s: the webhook attempt failed to run", job_id)
    return len(due)
