"""``POST /v1/chat/completions``, as OpenAI's: a job's checkpoint answers, through an inference
worker (``grpo worker --inference``). The API validates, resolves the checkpoint for the key's
owner, sends the request on the inference queue and waits for the answer (never torch here)."""

from __future__ import annotations

import time

import anyio.to_thread
from fastapi import APIRouter, Request

from api.content_type import accepts
from api.deps import CurrentOwner, DatabaseDep, SettingsDep
from api.errors import OpenAIRoute, responses
from jobs.chat import (
    ChatCompletionCreate,
    ChatCompletionOut,
    check_request,
    generation_request,
    resolve_target,
    worker_error,
)
from jobs.chat_queue import send_chat, wait_for_answer

router = APIRouter(prefix="/v1/chat", tags=["openai"], route_class=OpenAIRoute)


@router.post(
    "/completions",
    response_model=ChatCompletionOut,
    responses=responses(400, 404, 413, 415, 503, 504),
    dependencies=[accepts("application/json")],
)
async def create_chat_completion(
    body: ChatCompletionCreate, request: Request, db: DatabaseDep, settings: SettingsDep, owner: CurrentOwner
) -> ChatCompletionOut:
    """A chat completion from a checkpoint: `model` is a checkpoint's `fine_tuned_model` name, a job
    id (its best checkpoint, else its newest) or `JOB_ID:STEP`. `temperature: 0` is greedy. A 404
    `model_not_found` when the model is not one of yours; a 504 when no inference worker answered within
    GRPO_INFERENCE_TIMEOUT_S. Streaming is not supported (`stream: true` is a 400)."""
    check_request(body, settings)

    def resolve() -> dict:
        with db.transaction() as session:
            target = resolve_target(session=session, owner=owner, model=body.model, settings=settings)
        return {"target": target, "request": generation_request(body, target, settings)}

    resolved = await anyio.to_thread.run_sync(resolve)
    app = request.app.state.celery
    task_id = await anyio.to_thread.run_sync(send_chat, app, resolved["request"], settings)
    answer = await wait_for_answer(app, task_id, settings)
    refused = worker_error(answer, body.model)
    if refused is not None:
        raise refused
    return ChatCompletionOut(
        id=f"chatcmpl-{task_id.removeprefix('chat-')}",
        created=int(time.time()),
        model=resolved["target"].model,
        choices=answer["choices"],
        usage=answer["usage"],
        system_fingerprint=f"{resolved['target'].job_id}:{resolved['target'].step}",
    )
