"""The Python client against the live service: uvicorn on loopback, PostgreSQL, Redis and a real
worker process training the tiny model. The retry tests use a tiny fake endpoint instead: they
test what the client does with a 429 or a 503, not the service."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from api.main import create_app
from grpo_client import Client, GrpoError, RetryPolicy
from tests.service.factories import api_key, arithmetic_rows, free_port, job_spec, jsonl, wait_for
from tests.service.live import serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(redis_worker_settings, redis_worker) -> Iterator[str]:
    with serve(create_app(redis_worker_settings)) as url:  # sends jobs to Redis, where the worker takes them
        yield url


@pytest.fixture(scope="module")
def grpo(server, redis_worker_settings) -> Iterator[Client]:
    with Client(server, api_key(redis_worker_settings)) as client:
        yield client


@pytest.fixture(scope="module")
def dataset(grpo, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("data") / "arith.jsonl"
    path.write_bytes(jsonl(arithmetic_rows()))
    return grpo.datasets.upload(path, name="arith")


def test_a_job_from_upload_to_downloaded_checkpoint(
    grpo, dataset, tiny_model, redis_worker, tmp_path
) -> None:
    assert (dataset["name"], dataset["rows"]) == ("arith", 16)
    assert grpo.datasets.get(dataset["id"]) == dataset
    assert dataset["id"] in [d["id"] for d in grpo.datasets.list()]

    job = grpo.jobs.create(job_spec(dataset["id"], str(tiny_model), hyperparameters={"max_steps": 3}))
    assert job["status"] == "queued"
    job = grpo.jobs.wait(job["id"], timeout=120, poll_s=0.2)
    assert job["status"] == "succeeded", (job, redis_worker.log()[-3000:])

    assert [m["step"] for m in grpo.jobs.metrics(job["id"])] == [1, 2, 3]
    assert [m["step"] for m in grpo.jobs.metrics(job["id"], after_step=2)] == [3]
    assert [e["data"]["status"] for e in grpo.jobs.events(job["id"]) if e["kind"] == "status"] == [
        "queued",
        "running",
        "succeeded",
    ]

    samples = list(grpo.jobs.samples(job["id"]))  # the worker kept the first completion of each group
    assert sorted({s["step"] for s in samples}) == [1, 2, 3] and len(samples) == 3 * 2
    assert all(
        isinstance(s["completion"], str) and set(s["rewards"]) == {"exact_match", "regex"} for s in samples
    )
    assert all(s["step"] == 2 for s in grpo.jobs.samples(job["id"], step=2))

    assert [c["step"] for c in grpo.jobs.checkpoints(job["id"])] == [2, 3]
    directory = grpo.jobs.download(job["id"], dest=tmp_path)  # the newest checkpoint unless a step is given
    assert directory == tmp_path / f"{job['id']}-step-3"
    assert {"config.json", "model.safetensors"} <= {p.name for p in directory.iterdir()}
    assert not (directory / "trainer_state").exists() and not list(tmp_path.glob("*.part"))
    assert grpo.jobs.download(job["id"], 3, tmp_path, extract=False).stat().st_size > 0
    # a full fine-tune has no merged form: the checkpoint as it is, under the name the archive gives it
    merged = grpo.jobs.download(job["id"], dest=tmp_path / "merged", format="merged")
    assert merged == tmp_path / "merged" / f"{job['id']}-step-3" and (merged / "config.json").is_file()


def test_a_lora_job_downloads_as_adapter_or_merged(grpo, dataset, tiny_model, redis_worker, tmp_path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = job_spec(
        dataset["id"],
        str(tiny_model),
        hyperparameters={"max_steps": 2, "learning_rate": 1e-2, "lora": {"r": 4, "alpha": 8}},
        reward=[{"type": "regex", "pattern": "[0-9]", "score": "fraction"}],
    )  # varies in every group: a gradient
    job = grpo.jobs.wait(grpo.jobs.create(spec)["id"], timeout=120, poll_s=0.2)
    assert job["status"] == "succeeded", (job, redis_worker.log()[-3000:])
    final = grpo.jobs.checkpoints(job["id"])[-1]
    assert final["kind"] == "adapter" and final["merged_download_url"].endswith("/2/download?format=merged")
    assert any("merged model of step 2 written" in e["message"] for e in grpo.jobs.events(job["id"]))

    adapter = grpo.jobs.download(job["id"], 2, tmp_path, format="adapter")
    merged = grpo.jobs.download(job["id"], dest=tmp_path, format="merged")
    assert (adapter / "adapter_config.json").exists() and not (merged / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    tokens = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():  # the merged weights compute what base + adapter computes, and differ from the base
        assert torch.allclose(plain(tokens).logits, with_adapter(tokens).logits, atol=1e-4)
        with with_adapter.disable_adapter():
            assert not torch.allclose(plain(tokens).logits, with_adapter(tokens).logits, atol=1e-4)


def test_pause_resume_and_cancel(grpo, dataset, tiny_model) -> None:
    spec = job_spec(dataset["id"], str(tiny_model), hyperparameters={"max_steps": 500, "checkpoint_every": 0})
    job_id = grpo.jobs.create(spec)["id"]
    wait_for(lambda: grpo.jobs.get(job_id)["step"] >= 1, timeout=60, what="the first step")
    grpo.jobs.pause(job_id)
    assert grpo.jobs.wait(job_id, timeout=60, poll_s=0.2)["status"] == "paused"  # it returns for a pause too
    assert grpo.jobs.resume(job_id)["status"] == "queued"
    grpo.jobs.cancel(job_id)
    assert grpo.jobs.wait(job_id, timeout=60, poll_s=0.2)["status"] == "cancelled"


def test_list_iterates_every_page(grpo, dataset) -> None:
    # after the tests that train: each job sent costs the worker a fresh pool process, cancelled or not
    made = [grpo.jobs.create(job_spec(dataset["id"], "org/model", name=f"page-{i}")) for i in range(3)]
    for job in made:
        grpo.jobs.cancel(job["id"])
    ids = [job["id"] for job in grpo.pages("/v1/jobs", limit=1)]
    assert ids[:3] == [job["id"] for job in reversed(made)]  # newest first, one request per job
    assert {job["id"] for job in grpo.jobs.list(status="cancelled")} >= {job["id"] for job in made}


def test_the_servers_errors_arrive_as_grpo_errors(grpo, server, dataset) -> None:
    with pytest.raises(GrpoError) as missing:
        grpo.jobs.get("job_nope")
    assert (missing.value.status, missing.value.code) == (404, "job_not_found")
    with pytest.raises(GrpoError) as invalid:
        grpo.jobs.create(job_spec(dataset["id"], reward=[{"type": "telepathy"}]))
    assert (invalid.value.status, invalid.value.param) == (422, "reward[0].type")
    assert "unknown reward type" in str(invalid.value)
    with pytest.raises(GrpoError) as unauthorized, Client(server, "grpo_wrong") as stranger:
        stranger.datasets.get(dataset["id"])
    assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")


def test_rewards_run(grpo) -> None:
    result = grpo.rewards.run([{"type": "exact_match"}], [{"completion": "it is 5", "row": {"answer": "5"}}])
    assert result["data"] == [{"total": 1.0, "parts": {"exact_match": 1.0}, "errors": []}]


def test_base_url_and_key_come_from_the_environment(monkeypatch, server, redis_worker_settings) -> None:
    monkeypatch.setenv("GRPO_API_URL", server + "/")
    monkeypatch.setenv("GRPO_API_KEY", api_key(redis_worker_settings))
    with Client() as client:
        assert client.base_url == server
        assert isinstance(list(client.jobs.list()), list)


# ---- retries, against a fake endpoint that answers from a script ----


class Scripted(BaseHTTPRequestHandler):
    script: list[tuple[int, dict[str, str]]] = []
    seen: list[dict[str, str]] = []

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        Scripted.seen.append(dict(self.headers))
        status, headers = Scripted.script.pop(0) if Scripted.script else (200, {})
        body = json.dumps(
            {"id": "job_1", "status": "queued"}
            if status == 200
            else {"error": {"code": "busy", "message": f"status {status}", "param": None}}
        ).encode()
        self.send_response(status)
        for name, value in {
            **headers,
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
        }.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[str]:
    Scripted.script, Scripted.seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_429_and_503_are_retried_after_the_time_the_server_asks(fake) -> None:
    Scripted.script = [(429, {"Retry-After": "2"}), (503, {"Retry-After": "0"}), (502, {})]
    waits: list[float] = []
    with Client(fake, "grpo_k", sleep=waits.append, retry=RetryPolicy(backoff_s=0.5)) as client:
        assert client.jobs.create({"name": "x"})["id"] == "job_1"
    assert waits[:2] == [2.0, 0.0] and 1.0 <= waits[2] <= 2.0  # the third: 0.5 * 2**2, jittered by half
    keys = {headers["Idempotency-Key"] for headers in Scripted.seen}
    assert len(Scripted.seen) == 4 and len(keys) == 1  # one create, however often it is sent
    assert Scripted.seen[0]["Authorization"] == "Bearer grpo_k"


def test_a_409_is_retried_only_when_the_server_says_when(fake) -> None:
    """A create whose Idempotency-Key another request is still processing: a 409 with Retry-After,
    whose retry gets what that one made. A 409 without it (a real conflict) is final."""
    Scripted.script = [(409, {"Retry-After": "1"})]
    waits: list[float] = []
    with Client(fake, sleep=waits.append) as client:
        assert client.jobs.create({"name": "x"})["id"] == "job_1"
        assert waits == [1.0] and len({h["Idempotency-Key"] for h in Scripted.seen}) == 1
        Scripted.script = [(409, {})]
        with pytest.raises(GrpoError) as failed:
            client.jobs.create({"name": "x"})
    assert failed.value.status == 409 and waits == [1.0]


def test_retries_are_bounded(fake) -> None:
    Scripted.script = [(503, {"Retry-After": "3600"})] * 3
    waits: list[float] = []
    with Client(fake, sleep=waits.append, retry=RetryPolicy(max_retries=2, max_wait_s=5)) as client:
        with pytest.raises(GrpoError) as failed:
            client.jobs.get("job_1")
    assert waits == [5.0, 5.0] and (failed.value.status, failed.value.code) == (503, "busy")
    Scripted.script = [(400, {})]
    with Client(fake, sleep=waits.append) as client, pytest.raises(GrpoError):
        client.jobs.get("job_1")  # a 4xx other than 429 is final
    assert len(waits) == 2


def test_an_unreachable_server_is_retried_then_reported() -> None:
    waits: list[float] = []
    with Client(
        f"http://127.0.0.1:{free_port()}", sleep=waits.append, retry=RetryPolicy(max_retries=3)
    ) as client:
        with pytest.raises(GrpoError) as failed:
            client.jobs.get("job_1")
    assert len(waits) == 3 and failed.value.code == "connection_error" and failed.value.status is None
    assert "cannot reach" in str(failed.value)
