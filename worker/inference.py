"""The inference worker's task: answer a chat completion from a job's checkpoint.

``python -m worker --inference`` consumes only GRPO_INFERENCE_QUEUE, one request at a time in
its main process (the solo pool), so that the checkpoints it has loaded stay loaded: the
GRPO_INFERENCE_MODELS used most recently. The API has resolved the request's checkpoint for its
owner; the task re-reads it by ids (it may have been pruned since) and answers what
``jobs.chat.ChatCompletionOut`` needs besides the model's name: choices and usage.

The API deletes each answer once it has read it. An answer stored after its asker gave up (or the
REVOKED state of a request that expired in the queue) is deleted by Redis once GRPO's
``result_expires`` has passed; with the file backend, which nothing else cleans (Celery's cleanup
task needs ``celery beat``), by this worker before each request.

With ``GRPO_INFERENCE_BACKEND=vllm`` a LoRA job's checkpoint is answered by a vLLM engine of its
base model, the job's adapter loaded into it beside other jobs' (``worker.vllm_serving``);
full-model checkpoints, and adapters vLLM refuses, by transformers as without it. The worker
refuses to start when vLLM's environment is missing.
"""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_init, worker_shutdown

from jobs.artifacts import downloaded, inside, merged_dir
from jobs.cache import open_cache
from jobs.chat import CHAT_COMPLETION
from jobs.db import session_factory, unit_of_work
from jobs.errors import CheckpointNotFound
from jobs.model_paths import check_model, hub_id_shadowed, shadowed_message
from jobs.models import Job
from jobs.queries import get_checkpoint
from jobs.settings import Settings, get_settings
from jobs.store import ArtifactStore, StoreUnavailable, check_key, open_store
from trainer.config import ConfigError
from trainer.errors import ModelLoadError
from worker.vllm_serving import AdapterRefused, VLLMServing, check_vllm_environment

log = logging.getLogger(__name__)

SERVING_CACHE = "inference-cache"  # under the artifact directory: checkpoints fetched from the store


@dataclass(frozen=True)
class Source:
    """Where a checkpoint's weights are, and what identifies this version of them."""

    key: tuple[str, ...]
    directory: Path  # a full model, or an adapter (then ``base_model`` is what it adapts)
    base_model: str | None


class WarmModels:
    """The ``capacity`` checkpoints used most recently, loaded; the least recently used goes."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.loaded: OrderedDict[tuple[str, ...], tuple[Any, Any]] = OrderedDict()
        self.loads = 0

    def get(self, source: Source) -> tuple[Any, Any]:
        if source.key in self.loaded:
            self.loaded.move_to_end(source.key)
            return self.loaded[source.key]
        while len(self.loaded) >= self.capacity:
            # by key: a reference to the evicted model held here would keep it in memory (on the
            # GPU, beside the next one) until this call returns
            evicted = next(iter(self.loaded))
            del self.loaded[evicted]
            log.info(
                "unloaded checkpoint %s (GRPO_INFERENCE_MODELS=%d)", "/".join(evicted[:2]), self.capacity
            )
            release_memory()
        model_and_tokenizer = load(source)
        self.loads += 1
        self.loaded[source.key] = model_and_tokenizer
        log.info(
            "loaded checkpoint %s from %s (%d warm)",
            "/".join(source.key[:2]),
            source.directory,
            len(self.loaded),
        )
        return model_and_tokenizer


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load(source: Source) -> tuple[Any, Any]:
    """The model (an adapter merged into its base) in eval mode, and the checkpoint's tokenizer."""
    from trainer.model import default_device, load_causal_lm, load_tokenizer, resolve_dtype

    device = default_device()
    dtype = resolve_dtype("auto", device)
    tokenizer = load_tokenizer(source.directory)
    if source.base_model is None:
        model = load_causal_lm(source.directory, dtype, device)
    else:
        from peft import PeftModel

        base = load_causal_lm(source.base_model, dtype, device)
        try:
            model = PeftModel.from_pretrained(base, str(source.directory)).merge_and_unload()
        except Exception as exc:
            raise ModelLoadError(
                f"could not load the adapter onto its base model ({type(exc).__name__})"
            ) from exc
    return model.eval(), tokenizer


def checkpoint_source(request: dict[str, Any], settings: Settings, *, adapter: bool = False) -> Source:
    """The checkpoint of the request's job and step as stored now (``CheckpointNotFound`` once
    pruned); a LoRA job's adapter is served from its merged model when there is one, unless
    ``adapter`` (a vLLM engine serves the adapter itself on the base it shares with other jobs)."""
    assert settings.artifact_dir is not None
    job_id, step = str(request["job_id"]), int(request["step"])
    with unit_of_work(session_factory(settings.database_url)) as session:
        checkpoint = get_checkpoint(session=session, job_id=job_id, step=step)
        job = session.get(Job, job_id)
        assert job is not None  # the checkpoint's row references it
        path, kind, created, base_model = (
            checkpoint.path,
            checkpoint.kind,
            checkpoint.created_at,
            job.base_model,
        )
    store = open_store(settings)
    directory = inside(settings.artifact_dir, path) if store is None else serving_copy(store, path, settings)
    if directory is None or not directory.is_dir():
        raise CheckpointNotFound(job_id, step, reason="no longer has the files of that checkpoint")
    key = (job_id, str(step), created.isoformat(), path)
    if kind == "adapter":
        merged: Path | None = None if adapter else merged_dir(settings.job_dir(job_id), step)
        if store is not None and merged is not None:
            merged = serving_copy(store, store.key_of(merged), settings)
        if merged is not None and merged.is_dir():
            return Source(key=(*key, "merged"), directory=merged, base_model=None)
        # the operator's allowed model directories now, not when the job was created
        check_model(
            base_model,
            param="model",
            model_dirs=settings.model_dirs or [],
            artifact_dir=settings.artifact_dir,
        )
        # transformers (and the vLLM engine's base_generation_config) would load a path of the hub
        # id's name in this process's current directory instead: the operator's to fix, in the log
        if hub_id_shadowed(base_model):
            raise ModelLoadError(f"the base model of job {job_id}: {shadowed_message(base_model)}")
        return Source(key=key, directory=directory, base_model=base_model)
    return Source(key=key, directory=directory, base_model=None)


def serving_copy(store: ArtifactStore, key: str, settings: Settings) -> Path | None:
    """This machine's copy of the checkpoint (or merged model) stored at ``key``, fetched from the
    object store if it has none of the stored version (None while the store has no complete one).
    Without the resume state, which serving never reads; and in a cache of its own
    (``<artifact_dir>/inference-cache``), so that a training worker sharing this machine's artifact
    directory never finds its checkpoints replaced under it. Fetched through the bounded cache
    (``jobs.cache``), which may evict others first."""
    assert settings.artifact_dir is not None
    try:
        return open_cache(settings, store).fetch_dir(
            key, skip=lambda name: not downloaded(name), into=settings.artifact_dir / SERVING_CACHE
        )
    except ValueError:  # not a relative path: nothing the store holds
        return None


def serving_files_in_use(request: dict[str, Any], settings: Settings) -> AbstractContextManager[object]:
    """Hold this machine's serving copies of the request's job in use while it is answered (from
    fetching to loading), so that no process of the cache evicts them meanwhile."""
    store = open_store(settings)
    if store is None:
        return nullcontext()
    assert settings.artifact_dir is not None
    job = settings.artifact_dir / SERVING_CACHE / "jobs" / check_key(str(request["job_id"]))
    return open_cache(settings, store).in_use([job])


def answer(
    request: dict[str, Any], *, settings: Settings, models: WarmModels, serving: VLLMServing | None = None
) -> dict[str, Any]:
    """``{"choices": [...], "usage": {...}}``, or ``{"error": {"message", "param"}}`` for a
    request this checkpoint cannot answer. With ``serving``, a LoRA checkpoint is answered by
    vLLM (its adapter on its base model's engine), anything else by ``models``."""
    from trainer.chat import generate_chat

    try:
        source = checkpoint_source(request, settings, adapter=serving is not None)
        generation = None
        if serving is not None and source.base_model is not None:
            try:
                generation = serving.generate_chat(source, request)
            except AdapterRefused as exc:
                log.warning(
                    "vLLM cannot serve checkpoint %s; transformers answers it: %s",
                    "/".join(source.key[:2]),
                    exc,
                )
        if generation is None:
            model, tokenizer = models.get(source)
            generation = generate_chat(
                model,
                tokenizer,
                request["messages"],
                max_tokens=int(request["max_tokens"]),
                temperature=float(request["temperature"]),
                top_p=float(request["top_p"]),
                n=int(request["n"]),
                stop=list(request["stop"]),
                seed=request.get("seed"),
            )
    except CheckpointNotFound as exc:
        return {"error": {"code": "model_not_found", "message": exc.message, "param": "model"}}
    except ConfigError as exc:
        return {"error": {"message": exc.message, "param": exc.param}}
    except StoreUnavailable:
        log.warning(
            "chat request for %s step %s: artifact store unreachable",
            request.get("job_id"),
            request.get("step"),
            exc_info=True,
        )
        return {
            "error": {
                "code": "inference_unavailable",
                "message": "the checkpoint could not be fetched from this server's artifact store; "
                "try again shortly",
                "param": "model",
            }
        }
    except ModelLoadError as exc:  # its text may hold this machine's paths: the log keeps it
        log.warning("chat request for %s step %s: %s", request.get("job_id"), request.get("step"), exc)
        return {
            "error": {
                "code": "inference_unavailable",
                "message": "this checkpoint could not be loaded for "
                "inference; the operator's inference worker log has why",
                "param": "model",
            }
        }
    completion_tokens = sum(choice.completion_tokens for choice in generation.choices)
    return {
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": choice.text},
                "finish_reason": choice.finish_reason,
            }
            for index, choice in enumerate(generation.choices)
        ],
        "usage": {
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": generation.prompt_tokens + completion_tokens,
        },
    }


def remove_expired_answers(backend: Any) -> None:
    """Delete the stored answers older than ``result_expires`` that nobody read (their request
    timed out first): a listing of the file backend's directory; nothing to do for Redis, whose
    keys expire by themselves."""
    try:
        backend.cleanup()
    except Exception:  # never a reason to refuse the request; the next one tries again
        log.warning("could not remove expired chat answers from the result backend", exc_info=True)


_models: WarmModels | None = None
_serving: VLLMServing | None = None


def warm_models(settings: Settings) -> WarmModels:
    global _models
    if _models is None:
        _models = WarmModels(settings.inference_models)
    return _models


def vllm_serving(settings: Settings) -> VLLMServing | None:
    """This worker's vLLM engines when the operator chose that backend (started as first used)."""
    global _serving
    if _serving is None and settings.inference_backend == "vllm":
        _serving = VLLMServing(settings)
    return _serving


@worker_init.connect
def check_inference_backend(sender: Any = None, **_: object) -> None:
    """An inference worker with ``GRPO_INFERENCE_BACKEND=vllm`` and no vLLM environment exits at
    start, saying how to get one, rather than failing every chat request. (SystemExit: Celery logs
    and swallows a signal handler's exceptions.)"""
    settings = get_settings()
    if settings.inference_backend != "vllm" or sender is None:
        return
    if settings.inference_queue not in sender.app.amqp.queues.consume_from:
        return  # a training worker: it never answers chat requests
    try:
        check_vllm_environment()
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from exc


@worker_shutdown.connect
def stop_engines(**_: object) -> None:
    """Stop this worker's vLLM engines (they would also exit once it is gone: their stdin closes)."""
    if _serving is not None:
        _serving.close()


# ignore_result=False: the answer goes back through the result backend; acks_late=False: a request
# that kills its worker is not handed to the next one (it would likely kill it too, and its
# asker has moved on); track_started: a timed-out request says whether a worker had taken it.
@shared_task(name=CHAT_COMPLETION, bind=True, ignore_result=False, acks_late=False, track_started=True)
def chat_completion(self: Task, request: dict[str, Any]) -> dict[str, Any]:
    remove_expired_answers(self.backend)
    settings = get_settings()
    with serving_files_in_use(request, settings):
        return answer(
            request, settings=settings, models=warm_models(settings), serving=vllm_serving(settings)
        )
