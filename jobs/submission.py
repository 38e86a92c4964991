"""Job submission: a job request checked in full and stored as a queued job (``submit_job``), and
the stored spec turned into the trainer's RunConfig when it runs (``run_config_for``). The rules
are the trainer's own (``trainer.config``, ``trainer.rewards``, both free of torch), so the API
rejects exactly what the trainer would; ``as_invalid_request`` is where the trainer's
``ConfigError`` becomes the API's ``InvalidRequest``.

A request may say ``group_size`` at its top level or among its hyperparameters; the stored spec
(``stored_spec``) says it once, in the trainer's own config: everything else (the job's columns,
its responses, its run) is read from that."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from jobs.datasets import local_dataset
from jobs.errors import InvalidRequest, LimitExceeded, TooManyActiveJobs
from jobs.estimate import (
    PROMPT_SAMPLE_ROWS,
    check_a_prompt_fits,
    context_warnings,
    local_model_dir,
    read_model_shape,
)
from jobs.model_paths import check_job_models, check_job_models_loadable_here
from jobs.models import Job, since
from jobs.queries import (
    add_event,
    count_active_jobs,
    create_job,
    find_idempotent_resource,
    get_dataset,
    get_job,
    largest_live_worker,
    remember_idempotency_key,
)
from jobs.schemas import JobCreate
from jobs.settings import Settings
from trainer.config import (
    ConfigError,
    GRPOConfig,
    OperatorPolicy,
    RunConfig,
    check_eval_settings,
    check_prompts_for_processes,
    spec_hyperparameters,
)
from trainer.net import OutboundError, check_url_literal
from trainer.rewards import check_operator_policy, required_fields, validate_reward_specs

ENDPOINT = "POST /v1/jobs"  # what its Idempotency-Keys are scoped to
CAPPED = ("group_size", "prompts_per_step", "max_steps", "max_prompt_length", "max_completion_length")


@contextmanager
def as_invalid_request() -> Iterator[None]:
    """The trainer's ``ConfigError`` as the API's ``InvalidRequest``, with its message and param."""
    try:
        yield
    except ConfigError as exc:
        raise InvalidRequest(exc.message, param=exc.param) from None


@dataclass
class CheckedSpec:
    spec: dict[str, Any]  # what is stored (``stored_spec``)
    config: GRPOConfig  # its hyperparameters, as the trainer reads them


def check_job_request(*, session: Session, owner: str, request: JobCreate, settings: Settings) -> CheckedSpec:
    """Every check that can fail before a GPU is spent; raises ``InvalidRequest`` or ``DatasetNotFound``
    (the datasets must be ``owner``'s)."""
    with as_invalid_request():  # the values as posted: JSON mode would make a NaN null
        config = spec_hyperparameters(request.model_dump(include={"group_size", "hyperparameters"}))
    check_limits(config, settings, top_level_group_size=request.group_size is not None)
    check_devices(session=session, gpus=request.gpus, settings=settings)
    with as_invalid_request():
        check_prompts_for_processes(config, request.gpus, f"gpus ({request.gpus})")
        check_eval_settings(config, has_eval_dataset=request.eval_dataset_id is not None)
    rewards = check_rewards(request.reward, settings)
    with as_invalid_request():
        check_models(request.base_model, rewards, settings)
    if request.webhook_url is not None:
        check_webhook_url(str(request.webhook_url), settings)

    needed = required_fields(request.reward)
    for param in ("dataset_id", "eval_dataset_id"):
        dataset_id = getattr(request, param)
        if dataset_id is None:
            continue
        dataset = get_dataset(session=session, owner=owner, dataset_id=dataset_id, param=param)
        missing = sorted(needed - set(dataset.fields))
        if missing:
            raise InvalidRequest(
                f"the rewards read field(s) {', '.join(map(repr, missing))}, which dataset {dataset_id} "
                f"lacks in some rows (fields present in every row: {', '.join(dataset.fields)})",
                param="reward",
            )
        if param == "dataset_id" and dataset.rows <= PROMPT_SAMPLE_ROWS:
            # every row can be measured here at little cost (a larger dataset's first rows are only a
            # sample: the estimate warns of them); certain only with the model's tokenizer.json
            with as_invalid_request():
                check_a_prompt_fits(config, request.base_model, local_dataset(settings, dataset_id))
    return CheckedSpec(spec=stored_spec(request, rewards=rewards, config=config), config=config)


def stored_spec(request: JobCreate, *, rewards: list[dict[str, Any]], config: GRPOConfig) -> dict[str, Any]:
    """The one shape a job is stored in (``jobs.spec``): the trainer's own config serialised, with
    dataset ids. ``rewards`` normalised (``check_rewards``: defaults filled, a name each) and
    ``config`` complete (every default resolved, ``group_size`` among them, never at the top
    level), so that the job runs, and is shown, with what was decided when it was created, not
    with the defaults of whichever release reads it. The other fields are the request's own."""
    posted = request.model_dump(mode="json", exclude={"group_size", "hyperparameters", "reward"})
    return {**posted, "reward": rewards, "hyperparameters": config.to_dict()}


def operator_policy(settings: Settings) -> OperatorPolicy:
    """What this server lets a job's rewards do beyond their spec (the operator's settings)."""
    return OperatorPolicy(
        allow_private_hosts=tuple(settings.allow_private_hosts),
        sandbox_allow_unisolated=settings.sandbox_allow_unisolated,
        sandbox_allow_network=settings.sandbox_allow_network,
    )


def check_rewards(reward: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    """The normalised reward specs, or ``InvalidRequest`` naming ``reward[i].option``: the
    trainer's own checks, and what this server's operator allows (a non-public URL, a network)."""
    with as_invalid_request():
        specs = validate_reward_specs(reward)
        check_operator_policy(specs, operator_policy(settings))
    return specs


def check_webhook_url(url: str, settings: Settings) -> None:
    """A webhook needs this server's signing secret, and a URL whose address (when written in
    it) is public or listed by the operator; a host name is checked again at every delivery."""
    if settings.webhook_secret is None:
        raise InvalidRequest(
            "this server sends no webhooks: its operator has not set GRPO_WEBHOOK_SECRET (the "
            "key that signs them); leave webhook_url out, or poll GET /v1/jobs/{id}",
            param="webhook_url",
        )
    try:
        check_url_literal(url, settings.allow_private_hosts)
    except OutboundError as exc:
        raise InvalidRequest(str(exc), param="webhook_url") from None


def check_limits(config: GRPOConfig, settings: Settings, *, top_level_group_size: bool) -> None:
    """This server's caps (``GRPO_MAX_<FIELD>``) on the hyperparameters that size a job."""
    for field in CAPPED:
        value, setting = getattr(config, field), field if field.startswith("max_") else f"max_{field}"
        limit = getattr(settings, setting)
        if value > limit:
            param = field if field == "group_size" and top_level_group_size else f"hyperparameters.{field}"
            raise LimitExceeded(
                f"{field} is {value}, above this server's limit of {limit} (GRPO_{setting.upper()})",
                param=param,
            )
    if config.eval_pass_k > settings.max_group_size:  # k completions per eval row: a group's worth of work
        raise LimitExceeded(
            f"eval_pass_k is {config.eval_pass_k}, above this server's limit of "
            f"{settings.max_group_size} completions per prompt (GRPO_MAX_GROUP_SIZE)",
            param="hyperparameters.eval_pass_k",
        )


def check_devices(*, session: Session, gpus: int, settings: Settings) -> None:
    """A job asking for more devices than the largest live worker has is refused, naming that
    size: it would wait in its queue for a worker that is not there.

    The largest size comes from the workers themselves (``workers``, renewed by each one's
    heartbeat, ``worker.presence``) rather than from an operator's setting on the API, which would
    say what the workers were when someone last edited it: a worker that is added, restarted with
    other devices or stopped is known here within ``heartbeat_stale_s``.

    With no live worker at all the job is accepted: that is a service whose workers are
    restarting, not yet up (the embedded setup's first seconds) or scaled to zero, and its jobs
    wait in their queues until a worker starts, as they always have. Refusing would turn every
    restart of the workers into failed submissions that each user must notice and send again,
    and would say nothing true about the size the workers will have."""
    largest = largest_live_worker(session=session, seen_after=since(settings.heartbeat_stale_s))
    if largest is not None and gpus > largest:
        raise LimitExceeded(
            f"gpus is {gpus}, more than any worker here has: the largest worker here has {largest} "
            f"device{'s' if largest > 1 else ''}; ask for at most {largest}, or have the operator start "
            "a worker with more (GRPO_WORKER_DEVICES)",
            param="gpus",
        )


def check_models(base_model: str, rewards: list[dict[str, Any]], settings: Settings) -> None:
    """``base_model`` and every ``reward_model``'s model: a hub id or a directory this server's
    operator allows (``GRPO_MODEL_DIRS``), never in the artifact store. ``ConfigError`` naming
    the field; the API and the worker both call this."""
    assert settings.model_dirs is not None and settings.artifact_dir is not None
    check_job_models(base_model, rewards, model_dirs=settings.model_dirs, artifact_dir=settings.artifact_dir)


def request_hash(request: JobCreate, extra_spec: dict[str, Any] | None = None) -> str:
    body = {**request.model_dump(mode="json"), **(extra_spec or {})}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def run_config_for(job: Job, settings: Settings) -> RunConfig:
    """The trainer's view of a stored job, read from its spec alone (``stored_spec``; never its
    columns), its dataset ids made the uploaded files' paths. Its models are checked again
    (``ConfigError``) before the worker loads anything: the settings may have changed since the job
    was created; and a hub id must not name a path in the worker's current directory, which
    ``from_pretrained`` would load instead (``check_loadable_here``, never asked by the API)."""
    spec = job.spec
    check_models(spec["base_model"], spec["reward"], settings)
    check_job_models_loadable_here(spec["base_model"], spec["reward"])
    eval_id = spec.get("eval_dataset_id")
    eval_dataset = str(settings.dataset_path(eval_id).resolve()) if eval_id else None
    config = GRPOConfig.from_dict(spec["hyperparameters"])
    check_eval_settings(config, has_eval_dataset=eval_dataset is not None)
    return RunConfig(
        base_model=spec["base_model"],
        dataset=str(settings.dataset_path(spec["dataset_id"]).resolve()),
        reward=spec["reward"],
        hyperparameters=config,
        eval_dataset=eval_dataset,
        name=spec.get("name"),
        policy=operator_policy(settings),
    )


def submit_job(
    *,
    session: Session,
    owner: str,
    request: JobCreate,
    settings: Settings,
    idempotency_key: str | None = None,
    extra_spec: dict[str, Any] | None = None,
) -> tuple[Job, bool]:
    """Create a queued job for ``owner``, or return the one made earlier with the same
    ``Idempotency-Key`` (and body) within ``settings.idempotency_ttl_s``.

    ``extra_spec`` is stored in the spec beside the stored request (the OpenAI-compatible API
    keeps what only its objects show there); the trainer never reads it. The ``Idempotency-Key``'s
    hash is over the request as posted.
    Returns the job and whether it is new (only a new job is sent to the broker).
    """
    digest = request_hash(request, extra_spec)
    if idempotency_key:
        earlier = find_idempotent_resource(
            session=session,
            owner=owner,
            endpoint=ENDPOINT,
            key=idempotency_key,
            request_hash=digest,
            ttl_s=settings.idempotency_ttl_s,
        )
        if earlier is not None:
            return get_job(session=session, owner=owner, job_id=earlier), False
    checked = check_job_request(session=session, owner=owner, request=request, settings=settings)
    active = count_active_jobs(session=session, owner=owner)
    if active >= settings.max_active_jobs_per_owner:
        raise TooManyActiveJobs(active, settings.max_active_jobs_per_owner)
    job = create_job(
        session=session,
        owner=owner,
        spec={**checked.spec, **(extra_spec or {})},
    )
    model_dir = local_model_dir(request.base_model)
    for warning in context_warnings(checked.config, read_model_shape(model_dir) if model_dir else None):
        add_event(session=session, job_id=job.id, kind="warning", level="warning", message=warning)
    if idempotency_key:
        remember_idempotency_key(
            session=session,
            owner=owner,
            endpoint=ENDPOINT,
            key=idempotency_key,
            request_hash=digest,
            resource_id=job.id,
            ttl_s=settings.idempotency_ttl_s,
        )
    return job, True
