"""``Client``: the service's HTTP API as methods, grouped as ``datasets``, ``jobs`` and ``rewards``,
and ``chat`` with a job's checkpoint."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, cast

import httpx

from grpo_client.errors import GrpoError
from grpo_client.transport import RetryPolicy, send
from grpo_client.types import ChatCompletion, Checkpoint, Dataset, Event, Job, Metrics, RewardRun, Sample

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class Client:
    """``base_url`` and ``api_key`` default to ``GRPO_API_URL`` and ``GRPO_API_KEY``; the key goes
    as ``Authorization: Bearer``. Failed requests raise ``GrpoError``; 429s, 5xx and unreachable
    servers are retried per ``retry`` (honouring ``Retry-After``)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ):
        self.base_url = (base_url or os.environ.get("GRPO_API_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("GRPO_API_KEY")
        headers = {"User-Agent": "grpo-client/0.1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)
        self.rewards = Rewards(self)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
        files: Callable[[], dict[str, Any]] | None = None,
        data: dict[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        params = {k: v for k, v in (params or {}).items() if v is not None}

        def build() -> httpx.Request:
            return self.http.build_request(
                method,
                path,
                params=params,
                json=json,
                headers=headers,
                files=files() if files else None,
                data=data,
            )

        return send(self.http, build, self.retry, stream=stream, sleep=self.sleep)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params).json()

    def post(self, path: str, json: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=json, **kwargs).json()

    def pages(self, path: str, *, cursor: str = "after", key: str = "id", **params: Any) -> Iterator[Any]:
        """Every item of a cursor-paginated list: ``cursor=<the last item's key>`` until no more."""
        while True:
            page = self.get(path, **params)
            yield from page["data"]
            if not page["has_more"] or not page["data"]:
                return
            params[cursor] = page["data"][-1][key]

    def chat(
        self,
        model: str,
        messages: str | list[dict[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        timeout: float = 300.0,
        **options: Any,
    ) -> ChatCompletion:
        """A chat completion (``POST /v1/chat/completions``) from a checkpoint: ``model`` is a job
        id (its best checkpoint, else its newest), ``JOB_ID:STEP`` or a ``fine_tuned_model`` name;
        ``messages`` a list of ``{"role", "content"}`` or one user message's text. ``options``: ``n``,
        ``top_p``, ``stop``, ``seed``. The answer's text: ``["choices"][0]["message"]["content"]``. A
        timed-out request (504) is not retried: it would wait as long again."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            **options,
        }
        body = {key: value for key, value in body.items() if value is not None}

        def build() -> httpx.Request:
            return self.http.build_request("POST", "/v1/chat/completions", json=body, timeout=timeout)

        policy = replace(self.retry, statuses=self.retry.statuses - {504})
        return cast(ChatCompletion, send(self.http, build, policy, sleep=self.sleep).json())

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Datasets:
    def __init__(self, client: Client):
        self.client = client

    def upload(
        self, path: str | Path, *, name: str | None = None, idempotency_key: str | None = None
    ) -> Dataset:
        """Upload a JSONL file (every line is checked by the server; a 422 lists the bad ones)."""
        path = Path(path)
        opened: list[IO[bytes]] = []

        def files() -> dict[str, Any]:  # a fresh handle for each attempt
            opened.append(path.open("rb"))
            return {"file": (path.name, opened[-1], "application/jsonl")}

        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        try:
            response = self.client.request(
                "POST", "/v1/datasets", files=files, headers=headers, data={"name": name} if name else None
            )
        finally:
            for handle in opened:
                handle.close()
        return cast(Dataset, response.json())

    def list(self) -> Iterator[Dataset]:
        return self.client.pages("/v1/datasets", limit=100)

    def get(self, dataset_id: str) -> Dataset:
        return cast(Dataset, self.client.get(f"/v1/datasets/{dataset_id}"))


class Jobs:
    def __init__(self, client: Client):
        self.client = client

    def create(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Queue a job; retried requests carry one Idempotency-Key, so a retry never makes two."""
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return cast(Job, self.client.post("/v1/jobs", spec, headers=headers))

    def estimate(self, spec: dict[str, Any]) -> dict[str, Any]:
        """What the job would need (tokens per step, memory, time) and what would go wrong, checked
        as ``create`` checks it; nothing is created (``POST /v1/jobs?dry_run=true``)."""
        return cast(dict[str, Any], self.client.post("/v1/jobs", spec, params={"dry_run": "true"}))

    def list(self, *, status: str | None = None) -> Iterator[Job]:
        """Every job (newest first), fetched a page at a time as you iterate."""
        return self.client.pages("/v1/jobs", status=status, limit=100)

    def get(self, job_id: str) -> Job:
        return cast(Job, self.client.get(f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> Job:
        return cast(Job, self.client.post(f"/v1/jobs/{job_id}/cancel"))

    def pause(self, job_id: str) -> Job:
        return cast(Job, self.client.post(f"/v1/jobs/{job_id}/pause"))

    def resume(self, job_id: str) -> Job:
        return cast(Job, self.client.post(f"/v1/jobs/{job_id}/resume"))

    def metrics(self, job_id: str, *, after_step: int = 0) -> list[Metrics]:
        """Per-step metrics after ``after_step``: poll with the last step you have."""
        return list(
            self.client.pages(
                f"/v1/jobs/{job_id}/metrics", cursor="after_step", key="step", after_step=after_step
            )
        )

    def events(self, job_id: str, *, after: int = 0) -> list[Event]:
        return list(self.client.pages(f"/v1/jobs/{job_id}/events", after=after, limit=1000))

    def samples(self, job_id: str, *, step: int | None = None) -> Iterator[Sample]:
        return self.client.pages(f"/v1/jobs/{job_id}/samples", step=step, limit=100)

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        return cast(list[Checkpoint], self.client.get(f"/v1/jobs/{job_id}/checkpoints")["data"])

    def download(
        self,
        job_id: str,
        step: int | None = None,
        dest: str | Path = ".",
        *,
        extract: bool = True,
        format: Literal["adapter", "merged"] | None = None,
    ) -> Path:
        """Stream a checkpoint into ``dest``: the directory ``from_pretrained`` loads, or with
        ``extract=False`` the tar itself, named as the server names it (``<job>-step-N``, a LoRA
        job's merged model ``<job>-step-N-merged``; a full fine-tune has no other form, so
        ``format="merged"`` gives its plain checkpoint). A partial download or extraction never
        takes the final name and is removed when it fails; an earlier download of the same
        checkpoint in ``dest`` is replaced. ``OSError`` when ``dest`` cannot be written (its
        ``filename`` says where).
        ``step``: defaults to the job's best checkpoint (``keep_best_by``), else the newest one
        (with ``format="merged"``, the newest merged one: only a LoRA job's final checkpoint is).
        ``format``: a LoRA job's ``adapter`` (the default) or its final checkpoint ``merged`` into
        the base model."""
        if step is None:
            step = self.default_checkpoint(job_id, merged=format == "merged")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        response = self.client.request(
            "GET", f"/v1/jobs/{job_id}/checkpoints/{step}/download", params={"format": format}, stream=True
        )
        try:
            root = archive_root(response, f"{job_id}-step-{step}")
            partial = dest / f".{root}.tar.part"
            try:
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        out.write(chunk)
            except BaseException as exc:  # a full disk, a dropped connection, Ctrl-C: no partial file left
                with contextlib.suppress(OSError):
                    partial.unlink(missing_ok=True)
                if isinstance(exc, httpx.HTTPError):
                    raise GrpoError(
                        f"the download of {root} broke off: {exc}; try again", code="connection_error"
                    ) from exc
                raise
        finally:
            response.close()
        try:
            if not extract:
                tar = dest / f"{root}.tar"
                if tar.is_dir():
                    raise IsADirectoryError(errno.EISDIR, "is a directory, in the way of the tar", str(tar))
                return partial.replace(tar)
            return extract_checkpoint(partial, dest, root)
        finally:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)

    def default_checkpoint(self, job_id: str, *, merged: bool = False) -> int:
        """The step ``download`` fetches when none is given: the best checkpoint by the job's
        ``keep_best_by`` when it has one, else the newest (``merged``: the newest merged one)."""
        if not merged:
            best = [c["step"] for c in self.checkpoints(job_id) if c.get("best")]
            if best:
                return best[0]
        return self.newest_checkpoint(job_id, merged=merged)

    def newest_checkpoint(self, job_id: str, *, merged: bool = False) -> int:
        """The step of the job's newest checkpoint (``merged``: that can be downloaded merged)."""
        checkpoints = self.checkpoints(job_id)
        if merged:  # only a finished LoRA job's final checkpoint is merged
            checkpoints = [c for c in checkpoints if c["kind"] == "model" or c.get("merged_download_url")]
        if not checkpoints:
            what = (
                "merged checkpoint (a LoRA job's is written when it succeeds)" if merged else "checkpoint yet"
            )
            raise GrpoError(f"job {job_id} has no {what}", code="checkpoint_not_found")
        return max(c["step"] for c in checkpoints)

    def wait(self, job_id: str, *, timeout: float | None = None, poll_s: float = 2.0) -> Job:
        """The job once it has ended (succeeded, failed or cancelled) or paused (it waits for a
        resume, which may never come); ``TimeoutError`` otherwise."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (job := self.get(job_id))["status"] not in (*TERMINAL, "paused"):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout} s")
            self.client.sleep(poll_s)
        return job


# attachment; filename="job_…-step-3.tar": the name a download takes, one plain path component
ATTACHMENT = re.compile(r'filename="(?P<root>[A-Za-z0-9_-][A-Za-z0-9._-]*)\.tar"')


def archive_root(response: httpx.Response, fallback: str) -> str:
    """The name the server gives a checkpoint's tar (its Content-Disposition, less ``.tar``): what
    it holds, ``<job>-step-N`` or a LoRA job's ``<job>-step-N-merged``. ``fallback`` when it names none."""
    found = ATTACHMENT.search(response.headers.get("content-disposition", ""))
    return found["root"] if found else fallback


def extract_checkpoint(archive: Path, dest: Path, name: str) -> Path:
    """The tar ``archive`` (of one directory, as the server makes them) extracted into ``dest``,
    first beside it under a hidden name, then moved into place whole: the directory the archive
    holds, replacing an earlier download of it. Nothing is left behind when it fails: ``OSError``
    (``dest`` not writable, a full disk, a file in the way), ``GrpoError`` for a damaged tar."""
    staging = dest / f".{name}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            with tarfile.open(archive) as tar:
                tops = {
                    PurePosixPath(member).parts[0] for member in tar.getnames() if PurePosixPath(member).parts
                }
                tar.extractall(staging, filter="data")
        except tarfile.TarError as exc:
            raise GrpoError(
                f"the download of {name} is not a checkpoint tar this client can read ({exc}); try again",
                code="invalid_archive",
            ) from None
        if len(tops) != 1:
            raise GrpoError(
                f"the download of {name} holds {', '.join(sorted(tops)) or 'nothing'}, not one directory",
                code="invalid_archive",
            )
        [top] = tops
        target = dest / top
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise FileExistsError(
                errno.EEXIST, "is in the way of the checkpoint's directory; move or delete it", str(target)
            )
        if target.is_dir():  # an earlier download of this checkpoint: replaced only once the new one is whole
            replaced = dest / f".{top}.replaced"
            shutil.rmtree(replaced, ignore_errors=True)
            target.rename(replaced)
            try:
                (staging / top).rename(target)
            except OSError:
                replaced.rename(target)  # the earlier download stays as it was
                raise
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            (staging / top).rename(target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class Rewards:
    def __init__(self, client: Client):
        self.client = client

    def run(self, reward: list[dict[str, Any]], samples: list[dict[str, Any]]) -> RewardRun:
        """Score ``samples`` (each ``{"completion", "prompt"?, "row"?}``) with a reward spec."""
        return cast(RewardRun, self.client.post("/v1/rewards/run", {"reward": reward, "samples": samples}))
