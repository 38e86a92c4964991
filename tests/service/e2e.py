"""Helpers for end-to-end tests that drive a real worker through the HTTP API."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

from tests.service.factories import wait_for

TERMINAL = {"succeeded", "failed", "cancelled"}


def wait_until_ended(client: Any, job_id: str, timeout: float = 180) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in TERMINAL else None

    return wait_for(ended, timeout=timeout, what=f"job {job_id} to end", interval=0.2)


def wait_for_status(client: Any, job_id: str, status: str, timeout: float = 120) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == status or job["status"] not in TERMINAL, f"job ended {job['status']}: {job}"
        return job if job["status"] == status else None

    return wait_for(reached, timeout=timeout, what=f"job {job_id} to be {status}", interval=0.1)


def wait_for_step(client: Any, job_id: str, step: int, timeout: float = 180) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] not in TERMINAL, f"job ended before step {step}: {job}"
        return job if job["step"] >= step else None

    return wait_for(reached, timeout=timeout, what=f"job {job_id} to reach step {step}", interval=0.05)


def status_changes(client: Any, job_id: str) -> list[str]:
    events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return [
        e["data"]["status"] for e in events if e["kind"] == "status" and e["data"] and "status" in e["data"]
    ]


def metric_steps(client: Any, job_id: str) -> list[int]:
    return [m["step"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]]


def download_and_load(client: Any, job_id: str, step: int, into: Path) -> Any:
    """Download a checkpoint, extract it, load it with from_pretrained and generate a few tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    response = client.get(f"/v1/jobs/{job_id}/checkpoints/{step}/download")
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        archive.extractall(into, filter="data")
    directory = into / f"{job_id}-step-{step}"
    assert not (directory / "trainer_state").exists()
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    inputs = tokenizer("What is 2 + 2?", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    return model
