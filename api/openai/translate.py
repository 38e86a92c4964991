"""An OpenAI reinforcement fine-tuning request as a native ``JobCreate``: graders become reward
functions (``api.openai.graders``), OpenAI hyperparameters GRPO ones. What only OpenAI's objects
show (the method as posted, suffix, metadata) is kept under ``spec["openai"]`` of the job. A
native error's ``param`` is translated back to where the OpenAI request said it
(``reward[0].operation`` → ``method.reinforcement.grader.operation``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from api.openai.graders import GRADER, grader_rewards, invalid
from api.openai.schemas import FineTuningJobCreate
from jobs.errors import ServiceError
from jobs.schemas import DEFAULT_HYPERPARAMETERS as DEFAULTS
from jobs.schemas import JobCreate

HYPERPARAMETERS = "method.reinforcement.hyperparameters"
NATIVE_PARAMS = {
    "dataset_id": "training_file",
    "eval_dataset_id": "validation_file",
    "base_model": "model",
    "reward": GRADER,
    "hyperparameters": HYPERPARAMETERS,
    "group_size": f"{HYPERPARAMETERS}.group_size",
}
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


@dataclass
class Translation:
    """A native job request, what only the OpenAI objects show, and how to report a native param."""

    job: JobCreate
    openai: dict[str, Any]
    params: dict[str, str] = field(default_factory=dict)  # native param (or prefix) → OpenAI param
    grader_paths: list[str] = field(default_factory=list)  # reward[i] → the grader it came from

    def openai_param(self, param: str | None) -> str | None:
        """``reward[1].reference`` → ``method.reinforcement.grader.graders.fuzzy.reference``, etc."""
        if param is None:
            return None
        if param in self.params:
            return self.params[param]
        if param.startswith("reward["):
            index, _, rest = param[len("reward[") :].partition("]")
            if index.isdigit() and int(index) < len(self.grader_paths):
                rest = rest.lstrip(".")
                if rest == "weight":
                    return f"{GRADER}.calculate_output"
                return f"{self.grader_paths[int(index)]}.{rest}" if rest else self.grader_paths[int(index)]
        head, dot, rest = param.partition(".")
        if head in NATIVE_PARAMS:
            return f"{NATIVE_PARAMS[head]}{dot}{rest}"
        return param

    def reword(self, exc: ServiceError) -> ServiceError:
        """The native error, its ``param`` (and the ones in ``details``) as the OpenAI request names them."""
        exc.param = self.openai_param(exc.param)
        for detail in exc.details or []:
            if isinstance(detail.get("param"), str):
                detail["param"] = self.openai_param(detail["param"])
        return exc


def translate_job(body: FineTuningJobCreate, *, training_rows: int) -> Translation:
    """The native job for an OpenAI fine-tuning request, or ``InvalidRequest`` naming the OpenAI
    param. ``training_rows`` (of the training file) turns ``n_epochs`` into steps."""
    method = body.method
    if method is None:
        raise invalid(
            "method",
            'give method: {"type": "reinforcement", "reinforcement": {"grader": ...}}; this '
            "server runs reinforcement fine-tuning (GRPO) only",
        )
    if method.get("type") != "reinforcement":
        raise invalid(
            "method.type",
            f"{method.get('type')!r} fine-tuning is not supported here: this server runs "
            "reinforcement fine-tuning (GRPO) only; set method.type to 'reinforcement' and give a grader",
        )
    for key, value in method.items():
        if key not in ("type", "reinforcement") and value is not None:
            raise invalid(f"method.{key}", "only method.reinforcement is read here; remove it")
    rft = method.get("reinforcement")
    if not isinstance(rft, dict) or "grader" not in rft:
        raise invalid("method.reinforcement", 'give {"grader": {...}, "hyperparameters": {...}}')
    unknown = sorted(set(rft) - {"grader", "hyperparameters"})
    if unknown:
        raise invalid(
            f"method.reinforcement.{unknown[0]}",
            "unknown field; method.reinforcement takes grader and hyperparameters",
        )
    if body.hyperparameters:
        raise invalid(
            "hyperparameters",
            f"give hyperparameters in {HYPERPARAMETERS} (the top-level form is OpenAI's "
            "deprecated one, for supervised jobs)",
        )
    if body.integrations:
        raise invalid(
            "integrations",
            "integrations (e.g. wandb) are not supported here; follow a job's metrics with "
            "GET /v1/jobs/{id}/metrics or the dashboard",
        )
    check_metadata(body.metadata)
    rewards, grader_paths = grader_rewards(rft["grader"])
    given = rft.get("hyperparameters") or {}
    if not isinstance(given, dict):
        raise invalid(HYPERPARAMETERS, 'must be an object, e.g. {"n_epochs": 2, "batch_size": 8}')
    hyperparameters, params = grpo_hyperparameters(given, training_rows=training_rows, seed=body.seed)
    job = JobCreate(
        name=body.name or body.suffix,
        base_model=body.model,
        dataset_id=body.training_file,
        eval_dataset_id=body.validation_file,
        reward=rewards,
        hyperparameters=hyperparameters,
        webhook_url=body.webhook_url,
    )
    shown = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto", **given}
    openai = {
        "method": {
            "type": "reinforcement",
            "reinforcement": {"grader": rft["grader"], "hyperparameters": shown},
        },
        "suffix": body.suffix,
        "metadata": body.metadata,
    }
    return Translation(job=job, openai=openai, params=params, grader_paths=grader_paths)


def check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_KEYS:
        raise invalid("metadata", f"at most {MAX_METADATA_KEYS} keys, got {len(metadata)}")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise invalid(
                "metadata", f"keys are at most {MAX_METADATA_KEY} characters; {key[:20]!r}... is longer"
            )
        if len(value) > MAX_METADATA_VALUE:
            raise invalid(f"metadata.{key}", f"values are at most {MAX_METADATA_VALUE} characters")


def grpo_hyperparameters(
    given: dict[str, Any], *, training_rows: int, seed: int | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Native hyperparameters for OpenAI's reinforcement ones, and the params they answer for.

    ``batch_size`` is ``prompts_per_step``; ``n_epochs`` becomes ``max_steps`` (epochs × rows /
    batch, rounded up); ``learning_rate_multiplier`` multiplies ``learning_rate`` (1e-6 unless
    given); ``eval_interval`` is ``eval_every``; ``auto`` keeps the native default. Every other
    key is a native hyperparameter (``group_size``, ``max_steps``, ...), checked with the job.
    """
    openai_keys = (
        "n_epochs",
        "batch_size",
        "learning_rate_multiplier",
        "eval_interval",
        "eval_samples",
        "compute_multiplier",
        "reasoning_effort",
    )
    native = {key: value for key, value in given.items() if key not in openai_keys}
    params: dict[str, str] = {}

    def given_number(key: str, *, integer: bool) -> float | int | None:
        value = given.get(key)
        if value is None or value == "auto":
            return None
        kind = "an integer >= 1" if integer else "a number > 0"
        if (
            isinstance(value, bool)
            or not isinstance(value, int if integer else int | float)
            or not value > 0
            or not math.isfinite(value)
        ):
            raise invalid(f"{HYPERPARAMETERS}.{key}", f"must be 'auto' or {kind}, got {value!r}")
        return value

    def instead_of(key: str, native_key: str, value: Any) -> None:
        if native_key in native:
            raise invalid(f"{HYPERPARAMETERS}.{key}", f"give {key} or {native_key}, not both")
        native[native_key] = value
        params[f"hyperparameters.{native_key}"] = f"{HYPERPARAMETERS}.{key}"

    batch_size = given_number("batch_size", integer=True)
    if batch_size is not None:
        instead_of("batch_size", "prompts_per_step", batch_size)
    epochs = given_number("n_epochs", integer=True)
    if epochs is not None:
        per_step = native.get("prompts_per_step", DEFAULTS.prompts_per_step)
        if isinstance(per_step, int) and not isinstance(per_step, bool) and per_step >= 1:
            instead_of("n_epochs", "max_steps", math.ceil(epochs * training_rows / per_step))
    multiplier = given_number("learning_rate_multiplier", integer=False)
    if multiplier is not None:
        base = native.get("learning_rate", DEFAULTS.learning_rate)
        if isinstance(base, int | float) and not isinstance(base, bool):
            native["learning_rate"] = base * multiplier
            params["hyperparameters.learning_rate"] = f"{HYPERPARAMETERS}.learning_rate_multiplier"
    eval_interval = given_number("eval_interval", integer=True)
    if eval_interval is not None:
        instead_of("eval_interval", "eval_every", eval_interval)
    for key, hint in (
        ("eval_samples", "evaluation uses one completion per row of the validation file"),
        ("compute_multiplier", "group_size sets how many completions each prompt gets"),
    ):
        if given.get(key) not in (None, "auto"):
            raise invalid(f"{HYPERPARAMETERS}.{key}", f"has no equivalent here ({hint}); leave it 'auto'")
    if given.get("reasoning_effort") not in (None, "default"):
        raise invalid(
            f"{HYPERPARAMETERS}.reasoning_effort",
            "has no equivalent here (the model decides how long it "
            "reasons; max_completion_length caps it); leave it 'default'",
        )
    if seed is not None:
        if native.get("seed", seed) != seed:
            raise invalid("seed", f"differs from {HYPERPARAMETERS}.seed; give one of them")
        native["seed"] = seed
        params["hyperparameters.seed"] = "seed"
    return native, params
