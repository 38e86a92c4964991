"""Small factories for service tests: API keys, datasets, job specs, worker processes, waiting."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import SecretStr

from jobs.artifacts import describe_checkpoint
from jobs.db import transaction
from jobs.keys import issue_key
from jobs.queries import upsert_checkpoint
from jobs.schemas import JobCreate
from jobs.settings import Settings
from jobs.submission import stored_spec
from trainer.config import spec_hyperparameters
from trainer.rewards import validate_reward_specs

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = uuid.uuid4().hex[:8]
T = TypeVar("T")


def api_key(settings: Settings, owner: str = "alice") -> str:
    """The secret of a new API key for ``owner``, made as `grpo keys create` makes one."""
    with transaction(settings.database_url) as session:
        return issue_key(session=session, name=f"{owner}-key", owner=owner)[1]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def arithmetic_rows(n: int = 16) -> list[dict[str, str]]:
    return [{"prompt": f"What is {i} + {i % 5}?", "answer": str(i + i % 5)} for i in range(n)]


def upload(
    client: Any,
    rows: list[Any] | None = None,
    *,
    content: bytes | None = None,
    name: str = "data.jsonl",
    **request: Any,
) -> Any:
    """POST a dataset; ``request`` goes to the client (``headers=``, ...)."""
    body = content if content is not None else jsonl(rows if rows is not None else arithmetic_rows())
    return client.post("/v1/datasets", files={"file": (name, body, "application/jsonl")}, **request)


def job_spec(dataset_id: str, base_model: str = "org/model", **overrides: Any) -> dict[str, Any]:
    """A job spec small enough to train in seconds on the tiny model."""
    spec: dict[str, Any] = {
        "name": "test-job",
        "base_model": base_model,
        "dataset_id": dataset_id,
        "reward": [
            {"type": "exact_match", "weight": 1.0},
            {"type": "regex", "pattern": "[0-9]", "weight": 0.5},
        ],
        "group_size": 2,
        "hyperparameters": {
            "max_steps": 3,
            "prompts_per_step": 2,
            "max_completion_length": 8,
            "max_prompt_length": 32,
            "learning_rate": 1e-3,
            "checkpoint_every": 2,
        },
    }
    hyperparameters = overrides.pop("hyperparameters", {})
    spec.update(overrides)
    spec["hyperparameters"].update(hyperparameters)
    return spec


def stored_job_spec(request: dict[str, Any]) -> dict[str, Any]:
    """``request`` (a job request's JSON) in the shape a job is stored in, for tests that insert a job
    without the API: what ``POST /v1/jobs`` stores for it."""
    create = JobCreate.model_validate(request)
    return stored_spec(
        create, rewards=validate_reward_specs(create.reward), config=spec_hyperparameters(request)
    )


def make_checkpoint(
    settings: Settings, job_id: str, step: int, path: str | None = None, *, kind: str = "model"
) -> str:
    """A checkpoint on disk and in the job record, as a worker leaves one (a full model, or with
    ``kind="adapter"`` a LoRA adapter); ``path`` overrides the stored (relative) path. Returns the
    stored path."""
    directory = settings.job_dir(job_id) / "checkpoints" / f"step-{step:06d}"
    (directory / "trainer_state").mkdir(parents=True)
    if kind == "adapter":
        (directory / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (directory / "config.json").write_text('{"model_type": "llama"}')
    weights = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
    (directory / weights).write_bytes(bytes(range(256)) * 5)
    (directory / "trainer_state" / "optimizer.pt").write_bytes(b"x" * 100)
    assert settings.artifact_dir is not None
    relative = path if path is not None else directory.relative_to(settings.artifact_dir).as_posix()
    size = describe_checkpoint(directory)[1]  # what a download carries, as the worker records it
    with transaction(settings.database_url) as session:
        upsert_checkpoint(session=session, job_id=job_id, step=step, path=relative, kind=kind, bytes=size)
    return relative


def wait_for(check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_value(value: Any) -> str:
    """A setting as its ``GRPO_*`` variable spells it: lists comma-separated, secrets revealed."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return str(value)


def settings_env(settings: Settings) -> dict[str, str]:
    env = {
        f"GRPO_{name.upper()}": env_value(value)
        for name, value in settings.model_dump().items()
        if value is not None
    }
    return {
        **os.environ,
        **env,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


class ChildProcess:
    """A process started in its own session, so that kill/stop reach its children too."""

    process: subprocess.Popen | None
    log_path: Path

    def kill(self) -> None:
        """SIGKILL the whole group: no shutdown, no acknowledgement, no last words."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class WorkerProcess(ChildProcess):
    """``python -m worker`` in its own process group (so a SIGKILL takes the pool with it)."""

    count = 0

    def __init__(self, settings: Settings, *, concurrency: int = 1, inference: bool = False):
        """``concurrency`` > 1 runs that many jobs at once (a CPU worker; a GPU worker runs one);
        ``inference``: an inference worker (``python -m worker --inference``) instead."""
        self.settings, self.concurrency, self.inference = settings, concurrency, inference
        WorkerProcess.count += 1
        self.name = f"{'i' if inference else 'w'}{WorkerProcess.count}-{RUN_ID}"
        self.log_path = Path(settings.data_dir) / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            role = ["--inference"] if self.inference else ["--concurrency", str(self.concurrency)]
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker", "--hostname", f"{self.name}@%h", *role],
                cwd=ROOT,
                env=settings_env(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def forget_broker_keys(self) -> None:
        forget_broker_keys(self.settings)


def forget_broker_keys(settings: Settings) -> None:
    """Delete this run's keys from Redis (its queue, bindings and unacknowledged messages)."""
    import redis

    assert settings.broker_key_prefix, "refusing to delete every key"
    client = redis.Redis.from_url(settings.broker_url)
    for key in client.scan_iter(match=f"{settings.broker_key_prefix}*"):
        client.delete(key)
