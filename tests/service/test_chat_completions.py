"""Chat completions from a job's checkpoints through the official ``openai`` SDK: the API served
on loopback (PostgreSQL), a live inference worker process (``python -m worker --inference``) on
Redis, and checkpoints of real tiny-model weights recorded as a worker records them."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from api.cli import app as cli
from api.main import create_app
from grpo_client import Client, GrpoError
from jobs.artifacts import describe_checkpoint
from jobs.chat import checkpoint_model_name
from jobs.db import transaction
from jobs.queries import get_job, upsert_checkpoint
from jobs.settings import Settings
from tests.service.factories import WorkerProcess, api_key, bearer, job_spec, upload, wait_for
from tests.service.live import serve
from tests.service.test_dashboard import CHROMEDRIVER, CHROMIUM, browser, css  # noqa: F401  (browser: a fixture)
from tests.trainer.factories import letter_dataset, tiny_run
from trainer.config import LoraConfig
from trainer.loop import train
from trainer.prompts import prompt_text
from worker.merge import write_merged_model

pytestmark = pytest.mark.slow

MESSAGES = [
    {"role": "system", "content": "Reply with the number."},
    {"role": "user", "content": "What is 2 + 3?"},
]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def chat_settings(redis_worker_settings: Settings) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return redis_worker_settings.model_copy(
        update={
            "inference_queue": f"inference-{tag}",
            "inference_models": 2,
            "inference_timeout_s": 120.0,
            "max_chat_tokens": 64,
        }
    )


@pytest.fixture(scope="module")
def inference_worker(chat_settings: Settings) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(chat_settings, inference=True).start()
    try:
        wait_for(lambda: " ready." in worker.log(), timeout=180, what="the inference worker to be ready")
        yield worker
    finally:
        worker.stop()
        worker.forget_broker_keys()


@pytest.fixture(scope="module")
def server(chat_settings: Settings, inference_worker: WorkerProcess) -> Iterator[str]:
    # jobs are recorded but not run (no training worker here): their checkpoints are made below
    with serve(create_app(chat_settings, send=lambda job_id: None)) as url:
        yield url


def sdk(server: str, key: str, **options) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server}/v1", api_key=key, **{"max_retries": 0, "timeout": 150, **options}
    )


@pytest.fixture(scope="module")
def alice(chat_settings: Settings) -> str:
    return api_key(chat_settings, "alice")


@pytest.fixture(scope="module")
def client(server: str, alice: str) -> Iterator[openai.OpenAI]:
    with sdk(server, alice) as client:
        yield client


def perturbed_copy(tiny_model: Path, directory: Path, seed: int) -> Path:
    """The tiny model with every weight moved by seeded noise: a checkpoint unlike its base."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(directory)
    return directory


def record_checkpoint(settings: Settings, job_id: str, step: int, source: Path) -> None:
    """``source`` copied into the job's checkpoint directory and recorded, as the worker does."""
    assert settings.artifact_dir is not None
    directory = settings.job_dir(job_id) / "checkpoints" / f"step-{step:06d}"
    shutil.copytree(source, directory)
    kind, size = describe_checkpoint(directory)
    with transaction(settings.database_url) as session:
        upsert_checkpoint(
            session=session,
            job_id=job_id,
            step=step,
            kind=kind,
            bytes=size,
            path=directory.relative_to(settings.artifact_dir).as_posix(),
        )


def greedy(directory: Path, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """What ``transformers`` generates greedily from the checkpoint for the chat-templated prompt."""
    model = AutoModelForCausalLM.from_pretrained(directory)
    return greedy_from(model, AutoTokenizer.from_pretrained(directory), messages, max_new_tokens)


def greedy_from(
    model: torch.nn.Module, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int
) -> str:
    """What ``model`` generates greedily for the chat-templated prompt."""
    model.eval()
    ids = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False, return_tensors="pt")[
        "input_ids"
    ]
    output = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def answers_in_redis(settings: Settings) -> list[bytes]:
    """The result keys the Celery result backend holds under this module's prefix."""
    with redis.Redis.from_url(settings.broker_url) as client:
        return list(client.scan_iter(match=f"{settings.broker_key_prefix}celery-task-meta-*"))


@pytest.fixture(scope="module")
def job(
    chat_settings: Settings,
    server: str,
    alice: str,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict:
    """Alice's job with checkpoints at steps 1 and 2 (different weights), and what HF generates
    greedily from each."""
    with TestClient(create_app(chat_settings, send=lambda job_id: None), headers=bearer(alice)) as http:
        dataset = upload(http).json()["id"]
        job = http.post("/v1/jobs", json=job_spec(dataset, str(tiny_model))).json()
    expected, sources = {}, {}
    for step, seed in ((1, 11), (2, 22)):
        sources[step] = perturbed_copy(tiny_model, tmp_path_factory.mktemp(f"ckpt-{step}"), seed)
        record_checkpoint(chat_settings, job["id"], step, sources[step])
        expected[step] = greedy(sources[step], MESSAGES, MAX_TOKENS)
    assert expected[1] != expected[2], "the two checkpoints answer alike: pick other seeds"
    assert min(len(expected[1]), len(expected[2])) >= 4, expected  # long enough to stop inside
    with transaction(chat_settings.database_url) as session:
        name = checkpoint_model_name(get_job(session=session, owner="alice", job_id=job["id"]), 2)
    return {"id": job["id"], "expected": expected, "name": name, "sources": sources}


def test_a_checkpoint_answers_as_transformers_generates_greedily(
    client, job, inference_worker, chat_settings
) -> None:
    completion = client.chat.completions.create(
        model=job["name"], messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS
    )
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == job["name"]
    [choice] = completion.choices
    assert (choice.index, choice.message.role) == (0, "assistant")
    assert choice.message.content == job["expected"][2], inference_worker.log()[-3000:]
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens == len(
        "system: Reply with the number.\nuser: What is 2 + 3?\nassistant: "
    )  # one a char
    assert 1 <= usage.completion_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == MAX_TOKENS

    # the native references: the job id (its newest checkpoint) and JOB_ID:STEP
    newest = client.chat.completions.create(
        model=job["id"], messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS
    )
    assert (newest.model, newest.choices[0].message.content) == (job["name"], job["expected"][2])
    first = client.chat.completions.create(
        model=f"{job['id']}:1", messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS
    )
    assert first.model == job["name"].replace("ckpt-step-2", "ckpt-step-1")
    assert first.choices[0].message.content == job["expected"][1]
    # two checkpoints, each loaded once: the worker keeps them warm between requests
    assert inference_worker.log().count("loaded checkpoint") == 2, inference_worker.log()[-3000:]
    # each answer was deleted from Redis once the API had read it
    assert answers_in_redis(chat_settings) == []


def test_a_lora_checkpoint_answers_with_its_adapter_applied(
    client, chat_settings, alice, tiny_model, inference_worker, tmp_path
) -> None:
    """A LoRA job's checkpoint is an adapter: it answers as the adapter on its base model does
    (peft's ``PeftModel``), not as the base model; then from the merged model once there is one."""
    with TestClient(create_app(chat_settings, send=lambda job_id: None), headers=bearer(alice)) as http:
        spec = job_spec(upload(http).json()["id"], str(tiny_model), hyperparameters={"lora": {"r": 4}})
        job_id = http.post("/v1/jobs", json=spec).json()["id"]
    # two steps at a large learning rate, every linear layer adapted: the answer moves off the base's
    run = tiny_run(
        tiny_model,
        letter_dataset(tmp_path / "data.jsonl"),
        max_steps=2,
        learning_rate=5e-2,
        lora=LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    )
    trained = train(run, tmp_path / "out").checkpoint
    assert (trained / "adapter_model.safetensors").is_file() and not (trained / "model.safetensors").exists()
    record_checkpoint(chat_settings, job_id, 2, trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(trained))
    expected = greedy_from(adapted, tokenizer, MESSAGES, MAX_TOKENS)
    assert expected != greedy(tiny_model, MESSAGES, MAX_TOKENS), "the adapter did not change the answer"

    def answer() -> str:
        completion = client.chat.completions.create(
            model=f"{job_id}:2", messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS
        )
        return completion.choices[0].message.content

    checkpoint_dir = chat_settings.job_dir(job_id) / "checkpoints" / "step-000002"
    assert answer() == expected, inference_worker.log()[-3000:]
    assert f"loaded checkpoint {job_id}/2 from {checkpoint_dir} " in inference_worker.log()

    # the job's end merged the adapter into its base: that model is served, and answers the same
    merged = write_merged_model(checkpoint_dir, chat_settings.job_dir(job_id), 2)
    assert answer() == expected, inference_worker.log()[-3000:]
    assert f"loaded checkpoint {job_id}/2 from {merged} " in inference_worker.log()


def test_stop_sequences_n_and_seed(client, job) -> None:
    expected = job["expected"][2]
    stop = expected[2:4]
    stopped = client.chat.completions.create(
        model=job["id"], messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS, stop=[stop, "never-written"]
    )
    assert stopped.choices[0].message.content == expected[: expected.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == expected.index(stop) + len(
        stop
    )  # a token a char, up to the stop

    def sampled(seed: int) -> list[str]:
        completion = client.chat.completions.create(
            model=job["id"],
            messages=MESSAGES,
            temperature=1.0,
            top_p=0.9,
            n=3,
            seed=seed,
            max_tokens=MAX_TOKENS,
        )
        assert [choice.index for choice in completion.choices] == [0, 1, 2]
        return [choice.message.content for choice in completion.choices]

    assert sampled(7) == sampled(7)  # a seed makes sampling repeatable


def test_a_temperature_near_zero_samples_at_the_floor_vllm_samples_at(client, job) -> None:
    """logits / 1e-300 overflowed in the worker (every probability NaN: a 503); vLLM samples any
    temperature in (0, 0.01) at 0.01, and so does the transformers path."""

    def sampled(temperature: float) -> list[str]:
        completion = client.chat.completions.create(
            model=job["id"], messages=MESSAGES, temperature=temperature, n=2, seed=5, max_tokens=MAX_TOKENS
        )
        return [choice.message.content for choice in completion.choices]

    assert sampled(1e-300) == sampled(0.01)


def test_generate_chat_samples_below_the_floor_at_it(tiny_model) -> None:
    from trainer.chat import generate_chat
    from trainer.config import MIN_SAMPLING_TEMPERATURE

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def sampled(temperature: float, seed: int = 3) -> list[str]:
        generation = generate_chat(
            model, tokenizer, MESSAGES, max_tokens=MAX_TOKENS, temperature=temperature, n=3, seed=seed
        )
        return [choice.text for choice in generation.choices]

    assert sampled(1e-300) == sampled(5e-3) == sampled(MIN_SAMPLING_TEMPERATURE)
    assert sampled(1e-300) != sampled(1.0)  # sampling at the floor, not at the temperature asked for


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "a\x00"}],
                    }
                ]
            },
            "messages[0].content[1].text",
        ),
        ({"messages": [{"role": "user", "content": "hi", "name": "a\x00"}]}, "messages[0].name"),
        ({"model": "a\x00"}, "model"),
        ({"stop": ["ok", "\udfff"]}, "stop[1]"),
        ({"user": "\udc00"}, "user"),
    ],
    ids=[
        "lone-surrogate",
        "nul-in-a-part",
        "nul-in-name",
        "nul-in-model",
        "surrogate-in-stop",
        "surrogate-in-user",
    ],
)
def test_text_no_tokenizer_takes_is_a_400_naming_the_field(chat_settings, alice, change, param) -> None:
    """A lone surrogate (JSON can escape one, no encoding holds it) made the worker's tokenizer raise:
    a 503. Refused by the API, before any checkpoint is looked up, as a NUL is in every body."""
    body = {"model": "job_0000000000000000000000", "messages": MESSAGES, "max_tokens": 4, **change}
    with TestClient(create_app(chat_settings, send=lambda job_id: None), headers=bearer(alice)) as http:
        response = http.post(
            "/v1/chat/completions", content=json.dumps(body), headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", param)
    assert error["message"].startswith(f"{param}: contains a ")


def test_another_owners_model_is_not_found_like_a_missing_one(server, job, chat_settings) -> None:
    with sdk(server, api_key(chat_settings, "bob")) as bob:
        with pytest.raises(openai.NotFoundError) as theirs:
            bob.chat.completions.create(model=job["name"], messages=MESSAGES, max_tokens=4)
        missing_name = job["name"].replace(job["id"], "job_0000000000000000000000")
        with pytest.raises(openai.NotFoundError) as missing:
            bob.chat.completions.create(model=missing_name, messages=MESSAGES, max_tokens=4)
        for reference in (job["id"], f"{job['id']}:2"):
            with pytest.raises(openai.NotFoundError) as by_id:
                bob.chat.completions.create(model=reference, messages=MESSAGES, max_tokens=4)
            assert by_id.value.body["code"] == "model_not_found"
    assert theirs.value.body["code"] == "model_not_found" and theirs.value.body["param"] == "model"
    assert theirs.value.body == {
        **missing.value.body,
        "message": missing.value.body["message"].replace(missing_name, job["name"]),
    }


def test_models_that_name_no_checkpoint(client, job, chat_settings, alice, tiny_model) -> None:
    for model in (
        "job_0000000000000000000000",
        "gpt-4o",
        f"{job['id']}:7",
        "ft:gpt-4o:org::x",
        job["name"].replace(":alice:", ":bob:"),
    ):
        with pytest.raises(openai.NotFoundError) as refused:
            client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
        assert (refused.value.body["code"], refused.value.body["param"]) == ("model_not_found", "model"), (
            model
        )
    with pytest.raises(openai.NotFoundError, match="steps 1, 2"):
        client.chat.completions.create(model=f"{job['id']}:7", messages=MESSAGES, max_tokens=4)
    with TestClient(create_app(chat_settings, send=lambda job_id: None), headers=bearer(alice)) as http:
        fresh = http.post("/v1/jobs", json=job_spec(upload(http).json()["id"], str(tiny_model))).json()
    with pytest.raises(openai.NotFoundError, match="has no checkpoint yet"):
        client.chat.completions.create(model=fresh["id"], messages=MESSAGES, max_tokens=4)


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 9}, "n"),  # over GRPO_MAX_CHAT_CHOICES
        ({"max_tokens": 65}, "max_tokens"),  # over GRPO_MAX_CHAT_TOKENS
        ({"max_tokens": 0}, "max_tokens"),
        ({"stream": True}, "stream"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"extra_body": {"logit_bias": {"1": 5}}}, "logit_bias"),
        (
            {"messages": [{"role": "user", "content": "x" * 2100}]},
            "messages",
        ),  # longer than the model's 2048 positions
    ],
)
def test_bad_parameters_are_400s_naming_the_field(client, job, request_fields, param) -> None:
    fields = {"model": job["id"], "messages": MESSAGES, "max_tokens": 4, **request_fields}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**fields)
    assert refused.value.body["param"] == param, refused.value.body
    assert refused.value.body["message"].startswith(param)


def test_no_inference_worker_is_a_504_that_the_sdk_does_not_retry(chat_settings, job, alice) -> None:
    unserved = chat_settings.model_copy(
        update={"inference_queue": f"nobody-{uuid.uuid4().hex[:8]}", "inference_timeout_s": 1.0}
    )
    sent: list[httpx.Request] = []
    with (
        serve(create_app(unserved, send=lambda job_id: None)) as url,
        httpx.Client(event_hooks={"request": [sent.append]}) as http,
        sdk(url, alice, max_retries=2, http_client=http) as client,
    ):
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model=job["id"], messages=MESSAGES, max_tokens=4)
    assert refused.value.status_code == 504
    assert refused.value.body["code"] == "inference_timed_out"
    assert "no inference worker took the request" in refused.value.body["message"]
    assert "GRPO_INFERENCE_TIMEOUT_S" in refused.value.body["message"]
    assert len(sent) == 1  # x-should-retry: false


def test_grpo_chat_and_the_python_client(server, job, alice) -> None:
    env = {"GRPO_API_URL": server, "GRPO_API_KEY": alice}
    said = CliRunner().invoke(
        cli,
        [
            "chat",
            job["id"],
            "What is 2 + 3?",
            "--system",
            "Reply with the number.",
            "--max-tokens",
            str(MAX_TOKENS),
        ],
        env=env,
    )
    assert said.exit_code == 0, said.output
    assert said.stdout == job["expected"][2] + "\n"  # greedy by default
    assert job["name"] in said.stderr and "63 prompt" in said.stderr

    refused = CliRunner().invoke(cli, ["chat", "job_0000000000000000000000", "hi"], env=env)
    assert refused.exit_code == 1 and "'job_0000000000000000000000' does not exist" in refused.stderr

    with Client(server, alice) as grpo:
        completion = grpo.chat(f"{job['id']}:1", MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
        assert completion["choices"][0]["message"]["content"] == job["expected"][1]
        with pytest.raises(GrpoError) as bad:
            grpo.chat(job["id"], "hi", temperature=5)
        assert (bad.value.status, bad.value.param) == (400, "temperature")


@pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver",
)
def test_the_dashboard_chat_box_asks_the_jobs_checkpoint(browser, server, job, alice, chat_settings) -> None:  # noqa: F811
    browser.get(f"{server}/?key={alice}&poll_ms=300#{job['id']}")
    wait_for(lambda: len(css(browser, "#checkpoints li")) == 2, timeout=15, what="the checkpoints")
    assert css(browser, "#chat-target")[0].text == "newest"
    css(browser, "#chat-prompt")[0].send_keys("What is 2 + 3?")
    css(browser, "#chat-form button")[0].click()
    # greedy, up to the server's cap (GRPO_MAX_CHAT_TOKENS), from the newest checkpoint
    expected = greedy(
        job["sources"][2], [{"role": "user", "content": "What is 2 + 3?"}], chat_settings.max_chat_tokens
    )
    answer = wait_for(
        lambda: (text := css(browser, "#chat-answer")[0].get_attribute("textContent")) != "…" and text,
        timeout=60,
        what="the answer",
    )
    assert answer == expected
    assert css(browser, "#chat-about")[0].text.startswith(job["name"])
