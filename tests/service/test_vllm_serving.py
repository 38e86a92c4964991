"""Chat completions served by vLLM (``GRPO_INFERENCE_BACKEND=vllm``): several LoRA jobs' adapters on
one engine of their shared base model, each answering as transformers + peft does.

The engine runs in vLLM's own environment (``make vllm-setup`` builds .venv-vllm); without it the
engine tests are skipped. One engine (1 thread, fp32) serves the module: its jobs' adapters are
random peft adapters on one tiny Llama (head_dim 32: vLLM's CPU attention has no kernel for 16),
recorded as checkpoints the way a worker records them, in a database of the module's own.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from api.main import create_app
from jobs.artifacts import describe_checkpoint
from jobs.db import transaction
from jobs.queries import upsert_checkpoint
from jobs.settings import Settings
from tests.service.factories import WorkerProcess, api_key, bearer, job_spec, upload, wait_for
from trainer.chat import generate_chat
from trainer.tiny import make_tiny_model
from worker.inference import WarmModels, answer
from worker.vllm_serving import VLLMServing, adapter_rank, check_vllm_environment, cut_at_stop

try:
    check_vllm_environment()
    NO_ENGINE = ""
except RuntimeError as exc:
    NO_ENGINE = f"no vLLM environment ({exc})"
needs_engine = pytest.mark.skipif(bool(NO_ENGINE), reason=NO_ENGINE or "-")

pytestmark = pytest.mark.slow

MESSAGES = [
    {"role": "system", "content": "Reply with the number."},
    {"role": "user", "content": "What is 2 + 3?"},
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("vllm-serving-base"), num_heads=2)


@pytest.fixture(scope="module")
def serving_settings(redis_worker_settings: Settings) -> Settings:
    """The module's database, artifacts and Redis keys, shared by the in-process tests and the
    inference worker of the end-to-end one."""
    return redis_worker_settings.model_copy(
        update={
            "inference_queue": f"inference-{redis_worker_settings.queue}",
            "inference_backend": "vllm",
            "inference_vllm_max_loras": 2,
            "inference_models": 1,
            "max_chat_tokens": 64,
        }
    )


@pytest.fixture(scope="module")
def serving(serving_settings: Settings) -> Iterator[VLLMServing]:
    if NO_ENGINE:
        pytest.skip(NO_ENGINE)
    serving = VLLMServing(serving_settings, threads=1)
    yield serving
    serving.close()


def random_adapter(base_model: Path, directory: Path, seed: int, r: int = 4) -> Path:
    """A peft adapter of random weights on every linear layer (B too, so that it moves the answer),
    saved with the base's tokenizer as a LoRA job's checkpoint is."""
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_model),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False),
    )
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(directory)
    return directory


def create_job(settings: Settings, base_model: Path, **hyperparameters: Any) -> str:
    with TestClient(
        create_app(settings, send=lambda job_id: None), headers=bearer(api_key(settings))
    ) as http:
        spec = job_spec(upload(http).json()["id"], str(base_model), hyperparameters=hyperparameters)
        return http.post("/v1/jobs", json=spec).json()["id"]


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


def peft_answer(base_model: Path, adapter: Path, **options: Any) -> dict[str, Any]:
    """What transformers + peft (the adapter unmerged) answers, in the inference worker's shape."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), str(adapter)).eval()
    generation = generate_chat(model, AutoTokenizer.from_pretrained(adapter), MESSAGES, **options)
    return {
        "texts": [choice.text for choice in generation.choices],
        "finish_reasons": [choice.finish_reason for choice in generation.choices],
        "completion_tokens": sum(choice.completion_tokens for choice in generation.choices),
        "prompt_tokens": generation.prompt_tokens,
    }


def summary(answered: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in answered, answered
    return {
        "texts": [choice["message"]["content"] for choice in answered["choices"]],
        "finish_reasons": [choice["finish_reason"] for choice in answered["choices"]],
        "completion_tokens": answered["usage"]["completion_tokens"],
        "prompt_tokens": answered["usage"]["prompt_tokens"],
    }


def chat(job_id: str, step: int, **options: Any) -> dict[str, Any]:
    """A request as the API sends it (``jobs.chat.generation_request``)."""
    return {
        "job_id": job_id,
        "step": step,
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "top_p": 1.0,
        "n": 1,
        "stop": [],
        "seed": None,
        **options,
    }


@pytest.fixture(scope="module")
def jobs(serving_settings: Settings, base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three LoRA jobs on the one base, each with a checkpoint at step 1 of its own random adapter,
    and transformers + peft's greedy answer of each."""
    made = {}
    for label, seed in (("a", 1), ("b", 2), ("c", 3)):
        adapter = random_adapter(base_model, tmp_path_factory.mktemp(f"adapter-{label}"), seed)
        job_id = create_job(serving_settings, base_model, lora={"r": 4})
        record_checkpoint(serving_settings, job_id, 1, adapter)
        made[label] = {
            "id": job_id,
            "adapter": adapter,
            "expected": peft_answer(base_model, adapter, max_tokens=MAX_TOKENS, temperature=0.0),
        }
    texts = [job["expected"]["texts"][0] for job in made.values()]
    assert len(set(texts)) == 3, f"two adapters answer alike: pick other seeds ({texts})"
    assert min(len(text) for text in texts) >= 6, texts  # long enough to stop inside
    return made


def test_cut_at_stop_keeps_what_transformers_would_have_generated(base_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    ids = tokenizer("abcdefgh", add_special_tokens=False)["input_ids"]  # a token a char
    eos = [tokenizer.eos_token_id]
    assert cut_at_stop(tokenizer, ids, eos, ["cd", "zz"]) == ids[:4]  # up to the token completing "cd"
    assert cut_at_stop(tokenizer, ids, eos, ["bcdef", "cd"]) == ids[:4]  # whichever completes first
    assert cut_at_stop(tokenizer, ids, eos, ["zz"]) == ids
    assert cut_at_stop(tokenizer, ids, eos, []) == ids
    # a stop sequence only after the EOS: the EOS ends it, nothing is cut
    with_eos = ids[:2] + eos + ids[2:]
    assert cut_at_stop(tokenizer, with_eos, eos, ["cd"]) == with_eos


def test_adapter_rank_reads_r_and_rank_pattern(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"r": 8, "rank_pattern": {"q_proj": 32}}')
    assert adapter_rank(tmp_path) == 32


def test_a_worker_without_the_vllm_environment_refuses_to_start(
    serving_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRPO_VLLM_PYTHON", str(serving_settings.data_dir / "no-such-python"))
    worker = WorkerProcess(serving_settings, inference=True).start()
    assert worker.process is not None
    try:
        code = worker.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        worker.stop()
        pytest.fail(f"the worker did not exit: {worker.log()[-2000:]}")
    assert code != 0
    assert "GRPO_INFERENCE_BACKEND=vllm needs vLLM's own environment" in worker.log()
    assert "make vllm-setup" in worker.log() and " ready." not in worker.log()


@needs_engine
def test_two_jobs_adapters_on_one_engine_answer_as_transformers_and_peft(
    serving: VLLMServing, serving_settings: Settings, jobs: dict, base_model: Path
) -> None:
    models = WarmModels(1)
    for label in ("a", "b"):
        job = jobs[label]
        got = summary(answer(chat(job["id"], 1), settings=serving_settings, models=models, serving=serving))
        assert got == job["expected"], label
    assert models.loads == 0  # transformers loaded nothing: vLLM answered both
    assert serving.starts == 1 and list(serving.engines) == [str(base_model)]  # one engine, for the base
    [engine] = serving.engines.values()
    assert sorted(engine.request("GET", "/health")["loras"]) == sorted(
        f"{jobs[label]['id']}-step-1" for label in ("a", "b")
    )
    # the transformers path (the adapter merged into its base) answers the same: interchangeable
    hf = summary(answer(chat(jobs["b"]["id"], 1), settings=serving_settings, models=models))
    assert hf == jobs["b"]["expected"]


@needs_engine
def test_stop_sequences_n_and_seed_as_the_transformers_path(
    serving: VLLMServing, serving_settings: Settings, jobs: dict, base_model: Path
) -> None:
    job = jobs["a"]
    expected = job["expected"]["texts"][0]
    stop = [expected[3:5], "never-written"]

    def by_vllm(**options: Any) -> dict[str, Any]:
        request = chat(job["id"], 1, **options)
        return summary(answer(request, settings=serving_settings, models=WarmModels(1), serving=serving))

    stopped = by_vllm(stop=stop)
    assert stopped == peft_answer(
        base_model, job["adapter"], max_tokens=MAX_TOKENS, temperature=0.0, stop=stop
    )
    assert stopped["texts"] == [expected[: expected.index(stop[0])]] and stopped["finish_reasons"] == ["stop"]
    # greedy n: the one answer, n times
    assert by_vllm(n=2)["texts"] == [expected, expected]
    # a few tokens: cut at max_tokens, "length"
    short = by_vllm(max_tokens=3)
    assert short["texts"] == [expected[:3]] and short["finish_reasons"] == ["length"]
    # sampling: a seed repeats it, choices differ
    sampled = by_vllm(temperature=1.0, top_p=0.9, n=3, seed=7)
    assert sampled == by_vllm(temperature=1.0, top_p=0.9, n=3, seed=7)
    assert len(set(sampled["texts"])) > 1, sampled


@needs_engine
def test_past_max_loras_the_least_recently_used_adapter_is_unloaded_and_reloaded(
    serving: VLLMServing, serving_settings: Settings, jobs: dict
) -> None:
    models = WarmModels(1)

    def ask(label: str) -> None:
        got = summary(
            answer(chat(jobs[label]["id"], 1), settings=serving_settings, models=models, serving=serving)
        )
        assert got == jobs[label]["expected"], label

    def loaded() -> list[str]:
        [engine] = serving.engines.values()
        return sorted(engine.request("GET", "/health")["loras"])

    ask("a")
    ask("b")
    ask("c")  # GRPO_INFERENCE_VLLM_MAX_LORAS=2: a, used least recently, goes
    assert loaded() == sorted(f"{jobs[label]['id']}-step-1" for label in ("b", "c"))
    ask("a")  # loaded again from its checkpoint; b goes
    assert loaded() == sorted(f"{jobs[label]['id']}-step-1" for label in ("a", "c"))
    assert serving.starts == 1 and models.loads == 0


@needs_engine
def test_a_full_model_checkpoint_is_answered_by_transformers(
    serving: VLLMServing, serving_settings: Settings, base_model: Path, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(base_model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(tmp_path / "full")
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    tokenizer.save_pretrained(tmp_path / "full")
    job_id = create_job(serving_settings, base_model)
    record_checkpoint(serving_settings, job_id, 3, tmp_path / "full")

    models, starts = WarmModels(1), serving.starts
    got = summary(answer(chat(job_id, 3), settings=serving_settings, models=models, serving=serving))
    expected = generate_chat(model.eval(), tokenizer, MESSAGES, max_tokens=MAX_TOKENS, temperature=0.0)
    assert got["texts"] == [expected.choices[0].text]
    assert models.loads == 1 and serving.starts == starts  # transformers loaded it; no engine for it


@needs_engine
def test_an_adapter_of_a_larger_rank_restarts_the_engine_with_larger_slots(
    serving: VLLMServing, serving_settings: Settings, jobs: dict, base_model: Path, tmp_path: Path
) -> None:
    adapter = random_adapter(base_model, tmp_path / "rank-32", seed=4, r=32)
    job_id = create_job(serving_settings, base_model, lora={"r": 32})
    record_checkpoint(serving_settings, job_id, 1, adapter)
    starts, models = serving.starts, WarmModels(1)
    [before] = serving.engines.values()
    assert before.max_lora_rank == 16  # slots for the rank-4 jobs: the smallest that vLLM starts with

    got = summary(answer(chat(job_id, 1), settings=serving_settings, models=models, serving=serving))
    assert got == peft_answer(base_model, adapter, max_tokens=MAX_TOKENS, temperature=0.0)
    [after] = serving.engines.values()
    assert serving.starts == starts + 1 and after.max_lora_rank == 32 and not before.running()
    # the smaller adapters load into the new engine as they are asked for
    got = summary(answer(chat(jobs["b"]["id"], 1), settings=serving_settings, models=models, serving=serving))
    assert got == jobs["b"]["expected"] and models.loads == 0 and serving.starts == starts + 1


@needs_engine
def test_a_kv_cache_too_small_for_one_token_names_the_setting(
    serving_settings: Settings, base_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine starts with ``--max-model-len -1``: vLLM fits the length to the cache and fails
    when not even one token fits. The caller gets the worker's usual error; the log says which
    setting to raise, not vLLM's own advice (``gpu_memory_utilization``, which sizes nothing here)."""
    settings = serving_settings.model_copy(update={"inference_vllm_kv_cache_gib": 1e-5})
    job_id = create_job(settings, base_model, lora={"r": 4})
    record_checkpoint(settings, job_id, 1, random_adapter(base_model, tmp_path / "adapter", seed=1))
    serving = VLLMServing(settings, threads=1)
    try:
        with caplog.at_level("WARNING", logger="worker.inference"):
            answered = answer(chat(job_id, 1), settings=settings, models=WarmModels(1), serving=serving)
    finally:
        serving.close()
    assert answered["error"]["code"] == "inference_unavailable", answered
    assert not serving.engines and serving.starts == 0
    [record] = [r for r in caplog.records if r.name == "worker.inference"]
    assert "GRPO_INFERENCE_VLLM_KV_CACHE_GIB = 1e-05 GiB) is too small" in record.getMessage()
    assert "Cannot auto-fit max_model_len" in record.getMessage()  # vLLM's reason kept after it


@needs_engine
def test_an_inference_worker_on_vllm_answers_two_jobs_through_the_api(
    serving_settings: Settings, jobs: dict
) -> None:
    """``python -m worker --inference`` with GRPO_INFERENCE_BACKEND=vllm, asked through the API."""
    worker = WorkerProcess(serving_settings, inference=True).start()
    try:
        wait_for(lambda: " ready." in worker.log(), timeout=180, what="the inference worker to be ready")
        app = create_app(serving_settings, send=lambda job_id: None)
        with TestClient(app, headers=bearer(api_key(serving_settings))) as http:
            for label in ("a", "b"):
                response = http.post(
                    "/v1/chat/completions",
                    json={
                        "model": f"{jobs[label]['id']}:1",
                        "messages": MESSAGES,
                        "temperature": 0,
                        "max_tokens": MAX_TOKENS,
                    },
                )
                assert response.status_code == 200, (response.text, worker.log()[-3000:])
                [choice] = response.json()["choices"]
                assert choice["message"]["content"] == jobs[label]["expected"]["texts"][0], label
        log = worker.log()
        assert log.count("started a vLLM engine") == 1 and log.count(" as adapter ") == 2, log[-3000:]
        assert " warm)" not in log  # transformers loaded no checkpoint (worker.inference.WarmModels)
    finally:
        worker.stop()
        worker.forget_broker_keys()
