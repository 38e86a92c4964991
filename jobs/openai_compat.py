"""OpenAI fine-tuning requests and objects ↔ this server's datasets and GRPO jobs: pure translation.

A reinforcement fine-tuning request becomes a native ``JobCreate`` (graders become reward
functions, OpenAI hyperparameters become GRPO ones); what only OpenAI's objects show (the method
as posted, suffix, metadata) is kept under ``spec["openai"]`` of the job. A native error's
``param`` is translated back to where the OpenAI request said it (``reward[0].operation`` →
``method.reinforcement.grader.operation``).
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jobs.errors import InvalidRequest, ServiceError
from jobs.models import Checkpoint, Dataset, Job, JobEvent, JobStatus
from jobs.openai_schemas import (
    FileOut,
    FineTuningCheckpointOut,
    FineTuningJobCreate,
    FineTuningJobEventOut,
    FineTuningJobOut,
)
from jobs.schemas import JobCreate
from trainer.config import GRPOConfig
from trainer.data import chat_row
from trainer.errors import DatasetError

GRADER = "method.reinforcement.grader"
HYPERPARAMETERS = "method.reinforcement.hyperparameters"
DEFAULTS = GRPOConfig()
NATIVE_PARAMS = {"dataset_id": "training_file", "eval_dataset_id": "validation_file", "base_model": "model",
                 "reward": GRADER, "hyperparameters": HYPERPARAMETERS, "group_size": f"{HYPERPARAMETERS}.group_size"}

# OpenAI grader type → (native reward type, the grader's fields besides type and name).
GRADERS = {
    "string_check": ("string_check", {"input", "reference", "operation"}),
    "text_similarity": ("text_similarity", {"input", "reference", "evaluation_metric"}),
    "python": ("python_grader", {"source", "image_tag", "timeout_s", "memory_mb"}),
}
MODEL_GRADERS = ("score_model", "label_model")
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
MAX_FORMULA_CHARS = 1000


def bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


# --- files -------------------------------------------------------------------------------------


def rft_line(line: bytes) -> bytes:
    """One line of an OpenAI reinforcement fine-tuning file, as a row the trainer reads: its
    ``messages`` become the ``prompt`` (the row keeps them too, for graders that read
    ``item.messages``), as ``trainer.data.chat_row`` reads any chat-format row (``developer``
    messages become ``system`` ones, text content parts are joined). It is written into the stored
    file, so ``GET /v1/files/{id}/content`` shows it. A line this cannot read goes through
    unchanged: the dataset check reports it."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return line
    if not isinstance(row, dict) or "prompt" in row or not isinstance(row.get("messages"), list):
        return line
    try:
        row = chat_row(row)
    except DatasetError:
        return line
    return json.dumps(row, ensure_ascii=False).encode() + b"\n"


def file_object(dataset: Dataset) -> FileOut:
    return FileOut(id=dataset.id, bytes=dataset.bytes, created_at=unix(dataset.created_at), filename=dataset.name,
                   rows=dataset.rows, fields=dataset.fields)


# --- job requests ------------------------------------------------------------------------------


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
            index, _, rest = param[len("reward["):].partition("]")
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
        raise bad("method", "give method: {\"type\": \"reinforcement\", \"reinforcement\": {\"grader\": ...}}; this "
                  "server runs reinforcement fine-tuning (GRPO) only")
    if method.get("type") != "reinforcement":
        raise bad("method.type", f"{method.get('type')!r} fine-tuning is not supported here: this server runs "
                  "reinforcement fine-tuning (GRPO) only; set method.type to 'reinforcement' and give a grader")
    for key, value in method.items():
        if key not in ("type", "reinforcement") and value is not None:
            raise bad(f"method.{key}", "only method.reinforcement is read here; remove it")
    rft = method.get("reinforcement")
    if not isinstance(rft, dict) or "grader" not in rft:
        raise bad("method.reinforcement", "give {\"grader\": {...}, \"hyperparameters\": {...}}")
    unknown = sorted(set(rft) - {"grader", "hyperparameters"})
    if unknown:
        raise bad(f"method.reinforcement.{unknown[0]}", "unknown field; method.reinforcement takes grader and "
                  "hyperparameters")
    if body.hyperparameters:
        raise bad("hyperparameters", f"give hyperparameters in {HYPERPARAMETERS} (the top-level form is OpenAI's "
                  "deprecated one, for supervised jobs)")
    if body.integrations:
        raise bad("integrations", "integrations (e.g. wandb) are not supported here; follow a job's metrics with "
                  "GET /v1/jobs/{id}/metrics or the dashboard")
    check_metadata(body.metadata)
    rewards, grader_paths = grader_rewards(rft["grader"])
    given = rft.get("hyperparameters") or {}
    if not isinstance(given, dict):
        raise bad(HYPERPARAMETERS, "must be an object, e.g. {\"n_epochs\": 2, \"batch_size\": 8}")
    hyperparameters, params = grpo_hyperparameters(given, training_rows=training_rows, seed=body.seed)
    job = JobCreate(name=body.name or body.suffix, base_model=body.model, dataset_id=body.training_file,
                    eval_dataset_id=body.validation_file, reward=rewards, hyperparameters=hyperparameters,
                    webhook_url=body.webhook_url)
    shown = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto", **given}
    openai = {"method": {"type": "reinforcement", "reinforcement": {"grader": rft["grader"], "hyperparameters": shown}},
              "suffix": body.suffix, "metadata": body.metadata}
    return Translation(job=job, openai=openai, params=params, grader_paths=grader_paths)


def check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_KEYS:
        raise bad("metadata", f"at most {MAX_METADATA_KEYS} keys, got {len(metadata)}")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise bad("metadata", f"keys are at most {MAX_METADATA_KEY} characters; {key[:20]!r}... is longer")
        if len(value) > MAX_METADATA_VALUE:
            raise bad(f"metadata.{key}", f"values are at most {MAX_METADATA_VALUE} characters")


def grader_rewards(grader: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The reward functions for a grader, and for each the param of the grader it came from.

    A ``multi`` grader gives one reward per sub-grader, named by its key and weighted by its
    coefficient in ``calculate_output`` (a weighted sum of the keys).
    """
    if isinstance(grader, dict) and grader.get("type") == "multi":
        unknown = sorted(set(grader) - {"type", "name", "graders", "calculate_output"})
        if unknown:
            raise bad(f"{GRADER}.{unknown[0]}", "unknown field for a multi grader; its fields: calculate_output, "
                      "graders, name")
        graders = grader.get("graders")
        if isinstance(graders, dict) and isinstance(graders.get("type"), str):  # one grader, not a mapping
            graders = {str(graders.get("name") or graders["type"]): graders}
        if not isinstance(graders, dict) or not graders:
            raise bad(f"{GRADER}.graders", 'must map names to graders, e.g. {"exact": {"type": "string_check", ...}}')
        weights = linear_weights(grader.get("calculate_output"), set(graders), f"{GRADER}.calculate_output")
        rewards, paths = [], []
        for key, sub in graders.items():
            path = f"{GRADER}.graders.{key}"
            reward = native_reward(sub, path)
            reward.update(name=key, weight=weights.get(key, 0.0))
            rewards.append(reward)
            paths.append(path)
        return rewards, paths
    return [native_reward(grader, GRADER)], [GRADER]


def native_reward(grader: Any, param: str) -> dict[str, Any]:
    """The reward function for one (not multi) grader, or ``InvalidRequest`` at ``param``."""
    if not isinstance(grader, dict):
        raise bad(param, 'must be a grader object, e.g. {"type": "string_check", "input": "{{sample.output_text}}", '
                  '"reference": "{{item.answer}}", "operation": "eq"}')
    kind = grader.get("type")
    supported = ", ".join([*GRADERS, "multi"])
    if kind in MODEL_GRADERS:
        raise bad(f"{param}.type", f"{kind} graders are not supported: they call a model hosted by OpenAI. Score with "
                  "a model of your own (the native reward type reward_model: a sequence-classification model the "
                  "workers load) or with your own endpoint (type http) in a job created with POST /v1/jobs; "
                  f"graders supported here: {supported}")
    if kind == "multi":
        raise bad(f"{param}.type", "a multi grader cannot contain another multi grader")
    if kind not in GRADERS:
        raise bad(f"{param}.type", f"unknown grader type {kind!r}; supported here: {supported}")
    native, fields = GRADERS[kind]
    unknown = sorted(set(grader) - fields - {"type", "name"})
    if unknown:
        raise bad(f"{param}.{unknown[0]}", f"unknown field for a {kind} grader; its fields: "
                  f"{', '.join(sorted(fields | {'name'}))}")
    if grader.get("image_tag") is not None:
        raise bad(f"{param}.image_tag", "python graders run in this server's sandbox, on the standard library "
                  "only; remove image_tag")
    reward = {"type": native, **{key: value for key, value in grader.items() if key in fields and key != "image_tag"}}
    if grader.get("name") is not None:
        reward["name"] = grader["name"]
    return reward


def linear_weights(formula: Any, names: set[str], param: str) -> dict[str, float]:
    """``"0.7 * exact + 0.3 * fuzzy"`` → ``{"exact": 0.7, "fuzzy": 0.3}``: the formula must be a
    weighted sum of grader names (numbers, +, -, * and / by numbers, parentheses)."""
    first, last = sorted(names)[0], sorted(names)[-1]
    example = f"'0.7 * {first} + 0.3 * {last}'" if first != last else f"'{first}'"
    refuse = bad(param, f"only a weighted sum of the graders' names is supported here, e.g. {example} (no "
                 "functions, constants or products of graders)")
    if not isinstance(formula, str):
        raise bad(param, f"is required: a weighted sum of the graders' names, e.g. {example}")
    if len(formula) > MAX_FORMULA_CHARS:
        raise bad(param, f"is longer than {MAX_FORMULA_CHARS} characters")

    def linear(node: ast.AST) -> tuple[dict[str, float], float]:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return {}, float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in names:
                raise bad(param, f"names no grader {node.id!r}; the graders: {', '.join(sorted(names))}")
            return {node.id: 1.0}, 0.0
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
            terms, constant = linear(node.operand)
            sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
            return {name: sign * weight for name, weight in terms.items()}, sign * constant
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub):
            (left, left_constant), (right, right_constant) = linear(node.left), linear(node.right)
            sign = -1.0 if isinstance(node.op, ast.Sub) else 1.0
            terms = dict(left)
            for name, weight in right.items():
                terms[name] = terms.get(name, 0.0) + sign * weight
            return terms, left_constant + sign * right_constant
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult | ast.Div):
            (left, left_constant), (right, right_constant) = linear(node.left), linear(node.right)
            if isinstance(node.op, ast.Mult) and not left:  # 0.5 * exact: the graders go left
                left, left_constant, right, right_constant = right, right_constant, left, left_constant
            if right or (isinstance(node.op, ast.Div) and right_constant == 0):
                raise refuse
            factor = right_constant if isinstance(node.op, ast.Mult) else 1.0 / right_constant
            return {name: weight * factor for name, weight in left.items()}, left_constant * factor
        raise refuse

    try:
        terms, constant = linear(ast.parse(formula.strip(), mode="eval").body)
    except (SyntaxError, RecursionError):
        raise refuse from None
    if constant != 0 or not terms or not all(math.isfinite(weight) for weight in terms.values()):
        raise refuse
    return terms


def grpo_hyperparameters(given: dict[str, Any], *, training_rows: int,
                         seed: int | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Native hyperparameters for OpenAI's reinforcement ones, and the params they answer for.

    ``batch_size`` is ``prompts_per_step``; ``n_epochs`` becomes ``max_steps`` (epochs × rows /
    batch, rounded up); ``learning_rate_multiplier`` multiplies ``learning_rate`` (1e-6 unless
    given); ``eval_interval`` is ``eval_every``; ``auto`` keeps the native default. Every other
    key is a native hyperparameter (``group_size``, ``max_steps``, ...), checked with the job.
    """
    openai_keys = ("n_epochs", "batch_size", "learning_rate_multiplier", "eval_interval", "eval_samples",
                   "compute_multiplier", "reasoning_effort")
    native = {key: value for key, value in given.items() if key not in openai_keys}
    params: dict[str, str] = {}

    def given_number(key: str, *, integer: bool) -> float | int | None:
        value = given.get(key)
        if value is None or value == "auto":
            return None
        kind = "an integer >= 1" if integer else "a number > 0"
        if isinstance(value, bool) or not isinstance(value, int if integer else int | float) or not value > 0 \
                or not math.isfinite(value):
            raise bad(f"{HYPERPARAMETERS}.{key}", f"must be 'auto' or {kind}, got {value!r}")
        return value

    def instead_of(key: str, native_key: str, value: Any) -> None:
        if native_key in native:
            raise bad(f"{HYPERPARAMETERS}.{key}", f"give {key} or {native_key}, not both")
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
    for key, hint in (("eval_samples", "evaluation uses one completion per row of the validation file"),
                      ("compute_multiplier", "group_size sets how many completions each prompt gets")):
        if given.get(key) not in (None, "auto"):
            raise bad(f"{HYPERPARAMETERS}.{key}", f"has no equivalent here ({hint}); leave it 'auto'")
    if given.get("reasoning_effort") not in (None, "default"):
        raise bad(f"{HYPERPARAMETERS}.reasoning_effort", "has no equivalent here (the model decides how long it "
                  "reasons; max_completion_length caps it); leave it 'default'")
    if seed is not None:
        if native.get("seed", seed) != seed:
            raise bad("seed", f"differs from {HYPERPARAMETERS}.seed; give one of them")
        native["seed"] = seed
        params["hyperparameters.seed"] = "seed"
    return native, params


# --- objects -----------------------------------------------------------------------------------


def unix(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def checkpoint_model_name(job: Job, step: int) -> str:
    """OpenAI's naming, ``ft:MODEL:ORG:SUFFIX:JOB:ckpt-step-N``, with the owner as the organisation."""
    model = job.base_model.rstrip("/").rsplit("/", 1)[-1]
    suffix = (job.spec.get("openai") or {}).get("suffix") or ""
    return f"ft:{model}:{job.owner}:{suffix}:{job.id}:ckpt-step-{step}"


def job_object(job: Job, *, now: datetime, latest_metrics: dict[str, float | None] | None = None) -> FineTuningJobOut:
    """``latest_metrics``: the job's metrics at the step it reached, whose cumulative ``num_tokens``
    is OpenAI's ``trained_tokens`` once the job has ended (null before, as OpenAI has it)."""
    spec, extra = job.spec, job.spec.get("openai") or {}
    native = spec.get("hyperparameters") or {}
    method = extra.get("method") or {"type": "reinforcement", "reinforcement": {"grader": None, "hyperparameters": {
        "n_epochs": "auto", "batch_size": native.get("prompts_per_step", DEFAULTS.prompts_per_step),
        "learning_rate_multiplier": "auto"}}}
    shown = method["reinforcement"]["hyperparameters"]
    status = JobStatus(job.status)
    error = None
    if status == JobStatus.failed:
        error = {"code": "job_failed", "message": job.failure_reason or "the job failed", "param": None}
    trained_tokens = None
    if status in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled) and latest_metrics:
        seen = latest_metrics.get("num_tokens")
        trained_tokens = int(seen) if seen is not None else None
    estimated = None
    if status == JobStatus.running and job.started_at is not None and job.step > 0:
        elapsed = (now - job.started_at).total_seconds()
        estimated = unix(job.started_at) + int(elapsed * job.max_steps / job.step)
    return FineTuningJobOut(
        id=job.id, created_at=unix(job.created_at), finished_at=unix(job.finished_at), model=job.base_model,
        fine_tuned_model=checkpoint_model_name(job, job.step) if status == JobStatus.succeeded else None,
        organization_id=job.owner, status=status, training_file=job.dataset_id, validation_file=job.eval_dataset_id,
        hyperparameters={key: shown.get(key, "auto") for key in ("n_epochs", "batch_size", "learning_rate_multiplier")},
        method=method, result_files=[], seed=native.get("seed", DEFAULTS.seed), trained_tokens=trained_tokens, error=error,
        estimated_finish=estimated, integrations=[], metadata=extra.get("metadata"), suffix=extra.get("suffix"),
        step=job.step, max_steps=job.max_steps, reward=spec["reward"])


EVENT_LEVELS = {"info": "info", "warning": "warn", "error": "error"}


def event_object(event: JobEvent) -> FineTuningJobEventOut:
    return FineTuningJobEventOut(id=str(event.id), created_at=unix(event.created_at),
                                 level=EVENT_LEVELS.get(event.level, "info"), message=event.message,
                                 data=event.data, kind=event.kind)


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt_{job_id}_{step}"


def checkpoint_step(checkpoint_id: str) -> int | None:
    """The step of a ``checkpoint_id``, None if it is not one."""
    step = checkpoint_id.rpartition("_")[2]
    return int(step) if checkpoint_id.startswith("ftckpt_") and step.isdigit() else None


def checkpoint_object(job: Job, checkpoint: Checkpoint, metrics: dict[str, float | None] | None, *,
                      download_url: str) -> FineTuningCheckpointOut:
    """``download_url``: the API's (``api.routes.checkpoints.download_url``), absolute."""
    metrics = metrics or {}
    return FineTuningCheckpointOut(
        id=checkpoint_id(job.id, checkpoint.step), created_at=unix(checkpoint.created_at),
        fine_tuned_model_checkpoint=checkpoint_model_name(job, checkpoint.step), fine_tuning_job_id=job.id,
        step_number=checkpoint.step, metrics={"step": float(checkpoint.step), "train_loss": metrics.get("loss"), **metrics},
        download_url=download_url)
