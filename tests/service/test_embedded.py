"""The embedded default: one command, SQLite, the filesystem broker, a local artifact directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.e2e import download_and_load, metric_steps, status_changes, wait_until_ended
from tests.service.factories import ROOT, free_port, job_spec, upload, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Path]]:
    data_dir = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPO_")}
    # GRPO_DATA_DIR rather than --data-dir: the README's way, which `grpo keys create` reads too
    env.update(
        PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", GRPO_HEARTBEAT_INTERVAL_S="0.5", GRPO_DATA_DIR=str(data_dir)
    )
    log = (data_dir / "service.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--embedded", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    def up() -> bool:
        assert process.poll() is None, (data_dir / "service.log").read_text()
        try:
            return client.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, timeout=60, what="the embedded service to start", interval=0.3)
        created = subprocess.run(
            [sys.executable, "-m", "api.cli", "keys", "create", "me"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        client.headers["Authorization"] = f"Bearer {created.stdout.split()[-1]}"
        yield client, data_dir
    finally:
        client.close()
        process.terminate()  # the launcher alone: it must stop the API and the worker itself
        try:
            process.wait(timeout=60)
            wait_for(lambda: not group_alive(process.pid), timeout=10, what="the launcher's children to exit")
        finally:
            if group_alive(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
            log.close()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_embedded_service_runs_a_job_end_to_end(embedded, tiny_model, tmp_path) -> None:
    client, data_dir = embedded
    model = shutil.copytree(
        tiny_model, data_dir / "models" / "tiny"
    )  # the embedded default's GRPO_MODEL_DIRS
    dataset_id = upload(client).json()["id"]
    outside = client.post("/v1/jobs", json=job_spec(dataset_id, str(tiny_model)))
    assert outside.status_code == 422 and outside.json()["error"]["param"] == "base_model"
    job_id = client.post("/v1/jobs", json=job_spec(dataset_id, str(model), hyperparameters={"max_steps": 4}))
    job_id = job_id.json()["id"]

    statuses = []  # followed live over server-sent events; the stream ends with the job
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={"accept": "text/event-stream"}, timeout=120
    ) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))["data"] or {}
                statuses += [data["status"]] if "status" in data else []
    assert statuses == ["queued", "running", "succeeded"], (data_dir / "service.log").read_text()[-3000:]

    job = wait_until_ended(client, job_id, timeout=10)
    assert job["status"] == "succeeded" and job["step"] == 4
    assert status_changes(client, job_id) == statuses
    assert metric_steps(client, job_id) == [1, 2, 3, 4]
    assert (data_dir / "grpo.db").is_file() and list((data_dir / "broker").iterdir())
    assert (data_dir / "artifacts" / "jobs" / job_id / "checkpoints" / "step-000004").is_dir()
    assert [c["step"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]] == [2, 4]
    download_and_load(client, job_id, 4, tmp_path)

    # its checkpoint answers chat completions: the embedded inference worker, its answer a file
    chat = client.post(
        "/v1/chat/completions",
        timeout=150,
        json={
            "model": job_id,
            "messages": [{"role": "user", "content": "What is 1 + 1?"}],
            "max_tokens": 4,
            "temperature": 0,
        },
    )
    assert chat.status_code == 200, (chat.text, (data_dir / "service.log").read_text()[-3000:])
    assert chat.json()["model"].endswith(f":{job_id}:ckpt-step-4")
    assert chat.json()["usage"]["completion_tokens"] <= 4 and len(chat.json()["choices"]) == 1
    assert list((data_dir / "results").iterdir()) == []  # read, then deleted
