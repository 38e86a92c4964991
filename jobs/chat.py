"""Chat completions from a job's checkpoints: the request and answer (OpenAI's shapes), which
checkpoint a ``model`` names, and what the API sends the inference worker.

Torch-free: the API validates and resolves here, an inference worker (``worker.inference``)
generates. A ``model`` is a checkpoint's ``fine_tuned_model`` name
(``ft:BASE:OWNER:SUFFIX:JOB_ID:ckpt-step-N``), ``JOB_ID`` (its best checkpoint, else its newest) or
``JOB_ID:STEP``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError
from sqlalchemy.orm import Session

from jobs.artifacts import inside, stored_files
from jobs.errors import (
    InferenceUnavailable,
    InvalidRequest,
    JobNotFound,
    LimitExceeded,
    ModelNotFound,
    ServiceError,
)
from jobs.models import Checkpoint, Job
from jobs.queries import get_job, list_checkpoints
from jobs.settings import Settings
from jobs.store import open_store
from jobs.text import STORABLE, UNSTORABLE_ERROR, StorableStr, unstorable_reason
from trainer.config import MIN_SAMPLING_TEMPERATURE

CHAT_COMPLETION = "grpo.chat_completion"  # the inference worker's task, sent by name
MAX_STOP_SEQUENCES = 4  # as OpenAI


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


def _text_content(content: str | list[TextPart]) -> str | list[TextPart]:
    """A message's content, unless a string in it is not text a tokenizer takes: a lone surrogate
    (``\\ud800``, which JSON can escape but no encoding holds) or a NUL, as in every request body
    (jobs/text.py). The error names the place: ``messages[0].content``, ``...content[1].text``."""
    texts = (
        [((), content)]
        if isinstance(content, str)
        else [((i, "text"), p.text) for i, p in enumerate(content)]
    )
    for at, text in texts:
        reason = unstorable_reason(text)
        if reason is not None:
            raise PydanticCustomError(UNSTORABLE_ERROR, reason, {"at": at})
    return content


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart], AfterValidator(_text_content)]
    name: StorableStr | None = None

    def as_template_message(self) -> dict[str, str]:
        """What a chat template reads: ``developer`` is ``system`` (as for training files), text
        parts joined."""
        content = (
            self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        )
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionCreate(BaseModel):
    """OpenAI's chat completion request, the parts a checkpoint can answer; any other field is
    refused by name."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "ft:tiny:alice:demo:job_0193a5c1f00a7f3e2b9c4d1e:ckpt-step-200",
                    "messages": [{"role": "user", "content": "What is 3 + 4?"}],
                    "max_tokens": 32,
                    "temperature": 0,
                }
            ]
        },
    )

    model: StorableStr = Field(
        min_length=1,
        max_length=1024,
        description=(
            "A checkpoint's `fine_tuned_model` name, a job id (its best checkpoint, else its newest), "
            "or `JOB_ID:STEP`."
        ),
    )
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description=("Tokens to generate at most; defaults to, and is capped by, GRPO_MAX_CHAT_TOKENS.")
    )
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="The same as max_tokens."
    )
    temperature: float = Field(
        1.0,
        ge=0,
        le=2,
        description=(
            f"0: greedy (deterministic). Above 0 and below {MIN_SAMPLING_TEMPERATURE:g}: sampled at "
            f"{MIN_SAMPLING_TEMPERATURE:g}, as vLLM does."
        ),
    )
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, description="Choices to generate; capped by GRPO_MAX_CHAT_CHOICES.")
    stop: Annotated[str | list[str] | None, STORABLE] = Field(
        None,
        description=(
            f"Up to {MAX_STOP_SEQUENCES} sequences where generation stops (not included in the answer)."
        ),
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Makes sampling repeatable.")
    stream: bool = Field(False, description="Streaming is not supported here: false only.")
    user: StorableStr | None = Field(None, max_length=256, description="Accepted and ignored.")

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionOut(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="The checkpoint that answered, by its fine_tuned_model name.")
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage
    system_fingerprint: str | None = None


@dataclass(frozen=True)
class ChatTarget:
    """The checkpoint a request is answered from."""

    job_id: str
    step: int
    model: str  # its fine_tuned_model name, echoed in the answer


def checkpoint_model_name(job: Job, step: int) -> str:
    """OpenAI's naming, ``ft:MODEL:ORG:SUFFIX:JOB:ckpt-step-N``, with the owner as the organisation."""
    model = job.base_model.rstrip("/").rsplit("/", 1)[-1]
    suffix = (job.spec.get("openai") or {}).get("suffix") or ""
    return f"ft:{model}:{job.owner}:{suffix}:{job.id}:ckpt-step-{step}"


def parse_model(model: str) -> tuple[str, int | None] | None:
    """``(job id, step)`` named by ``model`` (step None: the job's best, else newest), or None if it
    names none. The ``ft:`` form is checked in full once the job is known (``resolve_target``)."""
    parts = model.split(":")
    if parts[0] == "ft":
        if (
            len(parts) < 6
            or not parts[-1].startswith("ckpt-step-")
            or not parts[-1][len("ckpt-step-") :].isdigit()
        ):
            return None
        return parts[-2], int(parts[-1][len("ckpt-step-") :])
    if len(parts) == 1:
        return parts[0], None
    if len(parts) == 2 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None


def resolve_target(*, session: Session, owner: str, model: str, settings: Settings) -> ChatTarget:
    """The checkpoint ``model`` names among ``owner``'s jobs, its files present; ``ModelNotFound``
    otherwise, with the same message for another owner's model as for one that does not exist."""
    parsed = parse_model(model)
    if parsed is None or len(parsed[0]) > 64:
        raise ModelNotFound(model)
    job_id, step = parsed
    try:
        job = get_job(session=session, owner=owner, job_id=job_id)
    except JobNotFound:
        raise ModelNotFound(model) from None
    checkpoints = list_checkpoints(session=session, job_id=job.id)
    if model.startswith("ft:") and step is not None and model != checkpoint_model_name(job, step):
        raise ModelNotFound(model)
    checkpoint = pick_checkpoint(job, checkpoints, step, model)
    if not checkpoint_present(checkpoint.path, settings):
        raise ModelNotFound(
            model,
            reason=f"job {job.id!r} no longer has the files of its checkpoint of step "
            f"{checkpoint.step}; list its checkpoints with GET /v1/jobs/{job.id}/checkpoints",
        )
    return ChatTarget(job_id=job.id, step=checkpoint.step, model=checkpoint_model_name(job, checkpoint.step))


def checkpoint_present(path: str, settings: Settings) -> bool:
    """Whether the checkpoint stored at ``path`` has its files: complete in the object store when
    the operator set one (the inference worker fetches it from there), else on this disk."""
    store = open_store(settings)
    if store is not None:
        return stored_files(store, path) is not None
    assert settings.artifact_dir is not None
    directory = inside(settings.artifact_dir, path)
    return directory is not None and directory.is_dir()


def pick_checkpoint(job: Job, checkpoints: list[Checkpoint], step: int | None, model: str) -> Checkpoint:
    """The checkpoint of ``step``; with no step, the job's best (by its ``keep_best_by``), else its newest."""
    if not checkpoints:
        raise ModelNotFound(
            model,
            reason=f"job {job.id!r} ({job.status}) has no checkpoint yet: a job writes one "
            "every checkpoint_every steps and when it ends",
        )
    if step is None:
        best = getattr(
            job, "best_checkpoint_step", None
        )  # chosen by evaluation, when the job has an eval set
        return next(
            (c for c in checkpoints if c.step == best), checkpoints[-1]
        )  # else the newest (oldest first)
    for checkpoint in checkpoints:
        if checkpoint.step == step:
            return checkpoint
    steps = ", ".join(str(c.step) for c in checkpoints)
    raise ModelNotFound(
        model, reason=f"job {job.id!r} has no checkpoint of step {step}; its checkpoints: steps {steps}"
    )


def check_request(body: ChatCompletionCreate, settings: Settings) -> None:
    """What the schema alone cannot say: ``InvalidRequest`` (``LimitExceeded`` past this server's
    limits, naming the setting) at the param at fault."""
    if body.stream:
        raise InvalidRequest(
            "streaming is not supported by this server yet; send stream: false (the whole "
            "answer comes in one response)",
            param="stream",
        )
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise InvalidRequest(
            "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens"
        )
    stops = body.stop_sequences
    if len(stops) > MAX_STOP_SEQUENCES or not all(stops):
        raise InvalidRequest(f"at most {MAX_STOP_SEQUENCES} sequences, none empty", param="stop")
    max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
    if max_tokens is not None and max_tokens > settings.max_chat_tokens:
        raise LimitExceeded(
            f"at most {settings.max_chat_tokens} tokens per completion on this server "
            f"(GRPO_MAX_CHAT_TOKENS); ask for fewer",
            param=param,
        )
    if body.n > settings.max_chat_choices:
        raise LimitExceeded(
            f"at most {settings.max_chat_choices} choices per request on this server "
            "(GRPO_MAX_CHAT_CHOICES); ask for fewer, or send several requests",
            param="n",
        )


def generation_request(body: ChatCompletionCreate, target: ChatTarget, settings: Settings) -> dict[str, Any]:
    """What the inference worker is sent (JSON): the checkpoint by ids, the messages and the
    sampling parameters (``check_request`` has passed)."""
    max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    return {
        "job_id": target.job_id,
        "step": target.step,
        "messages": [message.as_template_message() for message in body.messages],
        "max_tokens": max_tokens or settings.max_chat_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "n": body.n,
        "stop": body.stop_sequences,
        "seed": body.seed,
    }


def worker_error(answer: dict[str, Any], model: str) -> ServiceError | None:
    """A request the inference worker refused: its checkpoint gone since, unloadable, or e.g. a
    prompt longer than the model reads."""
    error = answer.get("error")
    if not isinstance(error, dict):
        return None
    message = str(error.get("message"))
    if error.get("code") == ModelNotFound.code:
        return ModelNotFound(model, reason=message)
    if error.get("code") == InferenceUnavailable.code:
        return InferenceUnavailable(message)
    return InvalidRequest(message, param=error.get("param"))
