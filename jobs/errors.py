"""Domain errors. Raised by jobs/ and api/ code alike; api/errors.py turns each kind into one
HTTP status and the service's error shape. Messages are written for the person who sent the
request: what is wrong and how to fix it."""

from __future__ import annotations

import math
from typing import Any


def whole_seconds(seconds: float) -> int:
    """A wait as a ``Retry-After`` header gives it: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(seconds))


class ServiceError(Exception):
    code = "invalid_request"
    retry_after_s: int | None = None  # whole seconds: the answer's Retry-After, and its message's

    def __init__(
        self, message: str, *, param: str | None = None, details: list[dict[str, Any]] | None = None
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details


class InvalidRequest(ServiceError):
    """The request cannot be carried out as sent."""


class InvalidDataset(InvalidRequest):
    code = "invalid_dataset"


class LimitExceeded(InvalidRequest):
    """A job spec over one of this server's limits (a setting, named in the message)."""

    code = "limit_exceeded"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"


class Unauthenticated(ServiceError):
    code = "unauthorized"


class RateLimited(ServiceError):
    code = "rate_limited"

    def __init__(self, retry_after_s: float, *, rate_per_s: float, burst: int):
        self.retry_after_s = whole_seconds(retry_after_s)
        super().__init__(
            f"too many requests with this API key, over this server's rate limit of {rate_per_s:g} "
            f"a second (GRPO_RATE_LIMIT_PER_S) in bursts of up to {burst} (GRPO_RATE_LIMIT_BURST); "
            f"retry in {self.retry_after_s} s"
        )


class TooManyRewardRuns(RateLimited):
    """An owner's reward dry-runs fill their line in this API process."""

    code = "too_many_reward_runs"

    def __init__(self, held: int, retry_after_s: float):
        self.retry_after_s = whole_seconds(retry_after_s)
        ServiceError.__init__(
            self,
            f"you already have {held} reward dry-run(s) scoring or waiting, this server's limit "
            "(GRPO_REWARD_RUNS_PER_KEY scoring plus GRPO_REWARD_RUN_QUEUE_PER_KEY waiting); retry "
            f"in {self.retry_after_s} s, once one has ended",
        )


class TooManyEventStreams(RateLimited):
    """An API key holds as many event streams as this API process lets one key hold."""

    code = "too_many_event_streams"

    def __init__(self, held: int, limit: int, retry_after_s: float):
        self.retry_after_s = whole_seconds(retry_after_s)
        ServiceError.__init__(
            self,
            f"this API key already has {held} event stream(s) open on this API process, this server's "
            f"limit (GRPO_MAX_EVENT_STREAMS_PER_KEY) is {limit}; close one (or read a job's events as "
            f"JSON pages, GET /v1/jobs/{{id}}/events?after=), and retry in {self.retry_after_s} s",
        )


class RewardRunTimedOut(LimitExceeded):
    """A reward dry-run ran past GRPO_REWARD_RUN_TIMEOUT_S; its work was stopped."""

    code = "reward_run_timed_out"


class TooManyActiveJobs(ServiceError):
    code = "too_many_active_jobs"

    def __init__(self, active: int, limit: int):
        super().__init__(
            f"you already have {active} queued or running job(s), this server's limit "
            f"(GRPO_MAX_ACTIVE_JOBS_PER_OWNER) is {limit}; wait for one to end or cancel one"
        )


class NotFound(ServiceError):
    code = "not_found"


class DatasetNotFound(NotFound):
    code = "dataset_not_found"

    def __init__(self, dataset_id: str, *, param: str | None = None):
        super().__init__(f"no dataset with id {dataset_id!r}; upload one with POST /v1/datasets", param=param)


class JobNotFound(NotFound):
    code = "job_not_found"

    def __init__(self, job_id: str):
        super().__init__(f"no job with id {job_id!r}")


class CheckpointNotFound(NotFound):
    code = "checkpoint_not_found"

    def __init__(self, job_id: str, step: int, *, reason: str = "has no checkpoint at that step"):
        super().__init__(
            f"job {job_id!r} {reason} (step {step}); list them with GET /v1/jobs/{job_id}/checkpoints",
            param="step",
        )


class ApiKeyNotFound(NotFound):
    code = "api_key_not_found"

    def __init__(self, key_id: str):
        super().__init__(f"no API key with id {key_id!r}; list them with `grpo keys list`")


class Conflict(ServiceError):
    code = "conflict"


class JobAlreadyFinished(Conflict):
    code = "job_already_finished"

    def __init__(self, job_id: str, status: str):
        super().__init__(
            f"job {job_id!r} already ended {status}; only queued, running or paused jobs can be cancelled"
        )


class DatasetInUse(Conflict):
    code = "dataset_in_use"

    def __init__(self, dataset_id: str, job_id: str):
        super().__init__(
            f"dataset {dataset_id!r} is used by job {job_id!r} (and perhaps others); a job's data "
            "stays as long as the job"
        )


class JobStateConflict(Conflict):
    """The job is not in a state the request applies to (e.g. resuming a job that is not paused)."""

    code = "job_state_conflict"

    def __init__(self, job_id: str, problem: str):
        super().__init__(f"job {job_id!r} {problem}")


class IdempotencyKeyReused(Conflict):
    code = "idempotency_key_reused"

    def __init__(self) -> None:
        super().__init__(
            "this Idempotency-Key was used with a different request body; use a new key",
            param="Idempotency-Key",
        )


class IdempotencyKeyInUse(Conflict):
    """Another request with the same Idempotency-Key is being processed: a retry a moment later
    gets what that one made. The code stays ``conflict``, as clients match it."""

    retry_after_s = 1

    def __init__(self) -> None:
        super().__init__(
            "another request with this Idempotency-Key is being processed; retry it in "
            f"{self.retry_after_s} s (Retry-After) to get what that request made",
            param="Idempotency-Key",
        )


class ModelNotFound(NotFound):
    """A chat completion's ``model`` names no checkpoint of the caller's (another owner's reads the same)."""

    code = "model_not_found"

    def __init__(self, model: str, *, reason: str | None = None):
        shown = model if len(model) <= 200 else model[:200] + "…"
        super().__init__(
            reason
            or (
                f"the model {shown!r} does not exist or you do not have access to it; name a job's "
                "fine_tuned_model (ft:…:ckpt-step-N), a job id (its best checkpoint, else its newest), "
                "or JOB_ID:STEP"
            ),
            param="model",
        )


class InferenceUnavailable(ServiceError):
    """The inference queue could not be reached, or the inference worker failed on a request."""

    code = "inference_unavailable"


class InferenceTimedOut(ServiceError):
    """No answer from an inference worker within GRPO_INFERENCE_TIMEOUT_S."""

    code = "inference_timed_out"
