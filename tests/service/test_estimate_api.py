"""``POST /v1/jobs?dry_run=true`` and ``grpo jobs create --estimate``: what a job will need, before
it is created, on PostgreSQL; and the warning a job gets when its lengths exceed its model's context."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from typer.testing import CliRunner

from api.cli import app as cli_app
from api.main import create_app
from grpo_client.cli import gib
from jobs.db import transaction
from jobs.models import Job, JobStatus, utcnow
from jobs.queries import append_metrics, claim_job
from tests.service.factories import job_spec, upload
from tests.service.live import serve

LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "vocab_size": 100,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
    "max_position_embeddings": 256,
}
# by hand: per layer q, o 64x64 each, k, v 64x32 each, gate/up/down 64x128 each, 2 norms of 64;
# embeddings and head 100x64 each (untied), the final norm 64
LLAMA_PARAMETERS = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 2 * 100 * 64 + 64


def model_dir(tmp_path: Path, **config) -> Path:
    directory = tmp_path / "models" / "llama-mini"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({**LLAMA, **config}))
    return directory


def prompt_rows(n: int = 10) -> list[dict]:
    return [{"prompt": "x" * 40, "answer": str(i)} for i in range(n)]  # 40 characters: 10 tokens at 4 a token


def spec_for(client, base_model: str, **hyperparameters) -> dict:
    dataset = upload(client, prompt_rows()).json()["id"]
    return job_spec(
        dataset,
        str(base_model),
        group_size=4,
        hyperparameters={
            "max_steps": 100,
            "prompts_per_step": 8,
            "max_prompt_length": 64,
            "max_completion_length": 32,
            **hyperparameters,
        },
    )


def dry_run(client, spec: dict, **request):
    return client.post("/v1/jobs", params={"dry_run": "true"}, json=spec, **request)


def test_an_estimate_counts_tokens_memory_and_time_and_creates_nothing(
    client, settings, sent, tmp_path
) -> None:
    spec = spec_for(client, model_dir(tmp_path))
    response = dry_run(client, spec, headers={"Idempotency-Key": "k1"})
    assert response.status_code == 200, response.text
    estimate = response.json()
    assert estimate["object"] == "job.estimate"
    tokens = estimate["tokens"]
    assert (tokens["prompt_tokens_mean"], tokens["prompt_tokens_from"], tokens["prompts_sampled"]) == (
        10,
        "characters",
        10,
    )
    assert tokens["per_step"] == 8 * 4 * (10 + 32) and tokens["total"] == 100 * tokens["per_step"]

    memory = estimate["memory"]
    assert (memory["parameters"], memory["parameters_from"], memory["dtype"]) == (
        LLAMA_PARAMETERS,
        "config.json",
        "float32",
    )
    assert (
        memory["weights_bytes"] == memory["reference_model_bytes"] == 4 * LLAMA_PARAMETERS
    )  # beta > 0: a copy
    assert memory["optimizer_bytes"] == 2 * memory["gradients_bytes"] == 2 * 4 * LLAMA_PARAMETERS
    kv_cache = (
        8 * 4 * (10 + 32) * 2 * 2 * (2 * 16) * 4
    )  # sequences x length x layers x (k, v) x kv dim x bytes
    assert memory["generation_cache_bytes"] == kv_cache
    assert memory["total_bytes"] == 5 * 4 * LLAMA_PARAMETERS + max(memory["activations_bytes"], kv_cache)

    time = estimate["time"]  # GRPO_WORKER_TOKENS_PER_S, scaled from the benchmark's model to this one
    rate = settings.worker_tokens_per_s * settings.worker_tokens_per_s_params / LLAMA_PARAMETERS
    assert time["tokens_per_second"] == pytest.approx(rate, rel=1e-3)
    assert time["seconds_per_step"] == pytest.approx(tokens["per_step"] / rate, rel=1e-3)
    assert time["total_seconds"] == pytest.approx(100 * tokens["per_step"] / rate, rel=1e-3)
    assert "GRPO_WORKER_TOKENS_PER_S" in time["tokens_per_second_from"]
    assert estimate["warnings"] == [] and any("4 characters a token" in note for note in estimate["notes"])

    assert client.get("/v1/jobs").json()["data"] == [] and sent == []  # nothing created, nothing queued
    created = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "k1"})  # the key was not spent
    assert created.status_code == 201 and "Idempotent-Replayed" not in created.headers


def test_lora_and_beta_zero_need_no_reference_copy_and_lora_trains_a_small_share(client, tmp_path) -> None:
    directory = model_dir(tmp_path)
    lora = dry_run(client, spec_for(client, directory, lora={"r": 4})).json()["memory"]
    # r x (in + out) for each of the 7 linear layers of each of the 2 layers
    adapters = 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert lora["trainable_parameters"] == adapters and lora["reference_model_bytes"] == 0
    assert lora["optimizer_bytes"] == 2 * 4 * adapters
    no_kl = dry_run(client, spec_for(client, directory, beta=0.0)).json()["memory"]
    assert no_kl["reference_model_bytes"] == 0 and no_kl["trainable_parameters"] == LLAMA_PARAMETERS
    half = dry_run(client, spec_for(client, directory, dtype="bfloat16")).json()["memory"]
    assert half["weights_bytes"] == 2 * LLAMA_PARAMETERS
    # bfloat16 gradients; AdamW's moments and a float32 master of each weight (trainer.optimizer)
    assert half["gradients_bytes"] == 2 * LLAMA_PARAMETERS
    assert half["optimizer_bytes"] == 3 * 4 * LLAMA_PARAMETERS


def test_lengths_beyond_the_context_are_warned_of_in_the_estimate_and_the_created_job(
    client, tmp_path
) -> None:
    spec = spec_for(
        client,
        model_dir(tmp_path, max_position_embeddings=64),
        max_prompt_length=48,
        max_completion_length=32,
    )
    [warning] = dry_run(client, spec).json()["warnings"]
    assert "48 + 32 = 80, beyond the model's context of 64 tokens" in warning

    job = client.post(
        "/v1/jobs", json=spec
    )  # created all the same (shorter sequences would fit), with a warning
    assert job.status_code == 201, job.text
    events = client.get(f"/v1/jobs/{job.json()['id']}/events").json()["data"]
    assert [(e["kind"], e["level"], e["message"]) for e in events][1:] == [("warning", "warning", warning)]


def test_prompts_longer_than_max_prompt_length_are_warned_of(client, tmp_path) -> None:
    dataset = upload(client, [{"prompt": "y" * 400, "answer": "1"}] + prompt_rows(3)).json()["id"]
    spec = job_spec(dataset, str(model_dir(tmp_path)), hyperparameters={"max_prompt_length": 50})
    estimate = dry_run(client, spec).json()
    assert estimate["tokens"]["prompt_tokens_max"] == 100 and estimate["tokens"]["prompts_truncated"] == 0.25
    assert estimate["tokens"]["prompt_tokens_mean"] == (50 + 3 * 10) / 4  # what is kept counts
    assert any(
        "25% of the sampled prompts are longer than max_prompt_length" in w for w in estimate["warnings"]
    )


def test_a_hub_model_has_no_memory_figures_and_says_why(client) -> None:
    estimate = dry_run(client, spec_for(client, "Qwen/Qwen2.5-0.5B-Instruct")).json()
    assert estimate["memory"] is None and estimate["tokens"]["per_step"] == 8 * 4 * (10 + 32)
    assert any("hub id" in note and "config.json" in note for note in estimate["notes"])
    assert "not scaled" in estimate["time"]["tokens_per_second_from"]


def test_a_dry_run_refuses_what_creating_would_refuse(client) -> None:
    spec = spec_for(client, "org/model", learning_rte=1e-5)
    error = dry_run(client, spec).json()["error"]
    assert (
        error["param"] == "hyperparameters.learning_rte"
        and "did you mean 'learning_rate'?" in error["message"]
    )


def test_the_time_comes_from_your_finished_jobs_of_the_model_when_there_are_some(
    client, settings, tmp_path
) -> None:
    directory = model_dir(tmp_path)
    spec = spec_for(client, directory)
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    with transaction(settings.database_url) as session:
        claim_job(session=session, job_id=job_id, worker="w")
        for step, rate in ((1, 900.0), (2, 1000.0), (3, 1100.0)):
            append_metrics(session=session, job_id=job_id, step=step, metrics={"tokens_per_second": rate})
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=JobStatus.succeeded,
                step=3,
                finished_at=utcnow(),
                started_at=utcnow() - timedelta(seconds=9),
            )
        )
    time = dry_run(client, spec).json()["time"]
    assert time["tokens_per_second"] == 1000.0 and "finished job" in time["tokens_per_second_from"]
    assert time["seconds_per_step"] == pytest.approx(8 * 4 * (10 + 32) / 1000.0)


def test_a_real_models_weights_and_tokenizer_are_read(client, tiny_model, tmp_path) -> None:
    """The tiny model's safetensors headers give its exact size, and its tokenizer.json the prompts'
    lengths; its config.json alone gives the same size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    size = sum(p.numel() for p in model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"prompt": f"What is {i} + {i * 7}?", "answer": str(8 * i)} for i in range(12)]
    dataset = upload(client, rows).json()["id"]
    estimate = dry_run(client, job_spec(dataset, str(tiny_model))).json()
    assert (estimate["memory"]["parameters"], estimate["memory"]["parameters_from"]) == (size, "safetensors")
    lengths = [len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]) for row in rows]
    assert estimate["tokens"]["prompt_tokens_from"] == "tokenizer"
    assert estimate["tokens"]["prompt_tokens_mean"] == pytest.approx(sum(lengths) / len(lengths), abs=0.05)

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_model / "config.json", config_only / "config.json")
    estimate = dry_run(client, job_spec(dataset, str(config_only))).json()
    assert (estimate["memory"]["parameters"], estimate["memory"]["parameters_from"]) == (size, "config.json")


def test_the_documented_example_counts_the_state_as_the_estimate_does(tmp_path) -> None:
    """The OpenAPI document's example, a bfloat16 full fine-tune of a 0.5B model (Qwen2.5-0.5B's
    shape): its weights, reference, gradients and optimizer state as ``memory`` counts them (a
    float32 master of each weight beside AdamW's float32 moments: 12 bytes a parameter), its total
    their sum with the larger of the activations and the cache; the descriptions say so."""
    from jobs.estimate import ModelShape, memory
    from jobs.schemas import EstimateMemory, JobEstimate
    from jobs.settings import Settings
    from trainer.config import GRPOConfig

    example = JobEstimate.model_config["json_schema_extra"]["examples"][0]["memory"]
    shape = ModelShape(
        parameters=example["parameters"],
        parameters_from="safetensors",
        hidden=896,
        layers=24,
        vocab=151936,
        intermediate=4864,
        heads=14,
        kv_heads=2,
        head_dim=64,
        max_positions=32768,
        root_parameters=151936 * 896 + 896,
    )
    computed = memory(GRPOConfig(dtype=example["dtype"]), shape, 61.4, Settings(data_dir=tmp_path))
    state = ("weights_bytes", "reference_model_bytes", "gradients_bytes", "optimizer_bytes")
    assert {name: example[name] for name in state} == {name: getattr(computed, name) for name in state}
    assert example["optimizer_bytes"] == 12 * example["trainable_parameters"]
    assert example["total_bytes"] == sum(example[name] for name in state) + max(
        example["activations_bytes"], example["generation_cache_bytes"]
    )
    fields = EstimateMemory.model_fields
    assert "float32 master" in fields["optimizer_bytes"].description
    assert "no float32 master" not in fields["optimizer_bytes"].description
    assert "training dtype" in fields["gradients_bytes"].description


def test_the_estimates_micro_batch_is_the_trainers() -> None:
    from jobs.estimate import FORWARD_TOKEN_BUDGET
    from trainer.loop import FORWARD_TOKEN_BUDGET as TRAINERS

    assert FORWARD_TOKEN_BUDGET == TRAINERS


def words(text: str) -> str:
    """``text`` with its runs of spaces and line breaks one space: the CLI wraps at the terminal's width."""
    return " ".join(text.split())


def test_grpo_jobs_create_estimate_prints_it_and_creates_nothing(client, settings, tmp_path) -> None:
    spec = spec_for(client, model_dir(tmp_path, max_position_embeddings=64))
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))
    path_two = tmp_path / "spec-2.yaml"
    path_two.write_text(json.dumps({**spec, "gpus": 2}))
    with serve(create_app(settings, send=lambda job_id: None)) as url:
        env = {"GRPO_API_URL": url, "GRPO_API_KEY": client.headers["Authorization"].split()[1]}
        shown = CliRunner().invoke(cli_app, ["jobs", "create", "--estimate", str(path)], env=env)
        as_json = CliRunner().invoke(cli_app, ["jobs", "create", "--estimate", "--json", str(path)], env=env)
        shown_two = CliRunner().invoke(cli_app, ["jobs", "create", "--estimate", str(path_two)], env=env)
        two = CliRunner().invoke(cli_app, ["jobs", "create", "--estimate", "--json", str(path_two)], env=env)
    assert shown.exit_code == 0, shown.output
    assert f"tokens per step  {8 * 4 * 42:,}" in shown.stdout and " a step, " in shown.stdout
    assert "memory " in shown.stdout and "warning: max_prompt_length + max_completion_length" in shown.stdout
    assert json.loads(as_json.stdout)["tokens"]["per_step"] == 8 * 4 * 42
    # one device: nothing gathered, so not shown
    assert "devices 1 memory " in words(shown.stdout) and "gathered" not in shown.stdout
    # two: each device's memory, with what it gathers beside its shards
    assert shown_two.exit_code == 0, shown_two.output
    memory, text = json.loads(two.stdout)["memory"], words(shown_two.stdout)
    assert memory["gathered_bytes"] > 0 and memory["training_gathered_bytes"] > 0
    assert "devices 2 (memory is each one's" in text
    assert f"gathered to generate {gib(memory['gathered_bytes'])}" in text
    assert f"gathered to train {gib(memory['training_gathered_bytes'])}" in text
    assert client.get("/v1/jobs").json()["data"] == []


def test_on_two_devices_each_holds_half_the_state_and_its_share_of_the_batch(client, tmp_path) -> None:
    """gpus=2: each device holds a shard (1/2) of the weights, reference, gradients and optimizer
    state, generates and trains 4 of the 8 prompts, and gathers beyond its shards the full weights
    to generate and, to train, the root and two layers (weights and gradients) with every row
    padded (fsdp_reshard "layer"), or the whole model with the lean rows ("step"); "auto" takes
    whichever totals less."""
    directory = model_dir(tmp_path, num_hidden_layers=8)
    spec = spec_for(client, directory)
    one = dry_run(client, spec).json()
    two = {
        reshard: dry_run(
            client,
            {**spec, "gpus": 2, "hyperparameters": {**spec["hyperparameters"], "fsdp_reshard": reshard}},
        ).json()
        for reshard in ("layer", "step", "auto")
    }
    assert (one["gpus"], two["layer"]["gpus"]) == (1, 2)
    assert two["layer"]["tokens"] == one["tokens"]  # the job's tokens: the same step, split

    layer, root = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64, 2 * 100 * 64 + 64
    weights = 4 * (8 * layer + root)  # float32 on this CPU server
    m1, m2, m2_step = one["memory"], two["layer"]["memory"], two["step"]["memory"]
    assert m1["parameters"] == m2["parameters"] == 8 * layer + root
    assert (m1["weights_bytes"], m1["gathered_bytes"], m1["training_gathered_bytes"]) == (weights, 0, 0)
    for part in ("weights_bytes", "reference_model_bytes", "gradients_bytes", "optimizer_bytes"):
        assert 2 * m2[part] == m1[part] > 0, part  # a shard each
    assert m2["gathered_bytes"] == m2_step["gathered_bytes"] == weights
    assert m2["training_gathered_bytes"] == 4 * 2 * (root + 2 * layer)  # full fine-tuning: + gradients
    assert m2_step["training_gathered_bytes"] == 2 * weights
    kv_cache = 4 * 4 * (10 + 32) * 8 * 2 * (2 * 16) * 4  # 4 prompts' groups of 4 on each device
    assert (
        2 * m2["generation_cache_bytes"] == m1["generation_cache_bytes"]
        and m2["generation_cache_bytes"] == kv_cache
    )
    saved_per_token = 8 * (6 * 64 + 2 * 32 + 4 * 128) * 4  # layers x saved tensors x bytes
    for memory, tokens in (
        (m1, 8 * (10 + 4 * 32)),  # its prompts' groups, each prompt once
        (m2_step, 4 * (10 + 4 * 32)),
        (m2, 4 * 4 * (10 + 32)),  # by layer: one padded row [prompt, completion] per completion
    ):
        head = 2 * min(1024, tokens) * 100 * 4  # a chunk of the LM head (logprob_chunk_size), and its grad
        assert memory["activations_bytes"] == tokens * saved_per_token + head
    assert m1["total_bytes"] == 5 * weights + m1["activations_bytes"]
    for memory in (m2, m2_step):
        assert (
            memory["total_bytes"]
            == 5 * weights // 2 + memory["training_gathered_bytes"] + memory["activations_bytes"]
        )
        assert memory["total_bytes"] < m1["total_bytes"]
    assert two["auto"]["memory"]["total_bytes"] == min(m2["total_bytes"], m2_step["total_bytes"])
    assert any("one device's of the 2" in note for note in two["layer"]["notes"])


def test_on_two_gpus_a_step_takes_half_the_time_at_best_and_two_cpu_processes_none_less(
    client, settings, sent, tmp_path
) -> None:
    directory = model_dir(tmp_path)
    spec = spec_for(client, directory)
    cpu_one, cpu_two = (dry_run(client, {**spec, "gpus": n}).json()["time"] for n in (1, 2))
    assert cpu_two["tokens_per_second"] == cpu_one["tokens_per_second"]
    assert "share its cores" in cpu_two["tokens_per_second_from"]
    gpu_settings = settings.model_copy(update={"worker_device": "cuda"})
    with TestClient(create_app(gpu_settings, send=sent.append), headers=client.headers) as gpu_client:
        gpu_one, gpu_two = (dry_run(gpu_client, {**spec, "gpus": n}).json()["time"] for n in (1, 2))
    assert gpu_one["tokens_per_second"] == cpu_one["tokens_per_second"]
    assert gpu_two["tokens_per_second"] == pytest.approx(2 * gpu_one["tokens_per_second"])
    assert gpu_two["seconds_per_step"] == pytest.approx(gpu_one["seconds_per_step"] / 2)
    assert "times 2 devices" in gpu_two["tokens_per_second_from"]

    # A finished job's throughput (all its processes') counts for jobs on as many devices only.
    def finished(gpus: int, rate: float) -> None:
        job_id = client.post("/v1/jobs", json={**spec, "gpus": gpus}).json()["id"]
        with transaction(settings.database_url) as session:
            claim_job(session=session, job_id=job_id, worker="w", devices=("cpu",) * gpus)
            append_metrics(session=session, job_id=job_id, step=1, metrics={"tokens_per_second": rate})
            session.execute(
                update(Job).where(Job.id == job_id).values(status=JobStatus.succeeded, finished_at=utcnow())
            )

    finished(1, 1000.0)
    assert dry_run(client, {**spec, "gpus": 1}).json()["time"]["tokens_per_second"] == 1000.0
    assert (
        dry_run(client, {**spec, "gpus": 2}).json()["time"]["tokens_per_second"]
        == cpu_two["tokens_per_second"]
    )
    finished(2, 1800.0)
    time = dry_run(client, {**spec, "gpus": 2}).json()["time"]
    assert time["tokens_per_second"] == 1800.0 and "on 2 devices" in time["tokens_per_second_from"]


def test_a_vllm_engine_beside_the_trainer_is_counted(client, tmp_path) -> None:
    """generation vllm: the engine's weights and its KV cache sit on the device too, beside the
    training state; awake while the policy trains unless vllm_sleep."""
    directory = model_dir(tmp_path)
    hf = dry_run(client, spec_for(client, directory)).json()["memory"]
    awake = dry_run(client, spec_for(client, directory, generation="vllm", vllm_kv_cache_gib=0.5)).json()[
        "memory"
    ]
    asleep = dry_run(
        client, spec_for(client, directory, generation="vllm", vllm_kv_cache_gib=0.5, vllm_sleep=True)
    ).json()["memory"]
    assert hf["generation_engine_bytes"] == 0
    engine = awake["weights_bytes"] + (1 << 29)
    assert awake["generation_engine_bytes"] == asleep["generation_engine_bytes"] == engine
    state = sum(
        awake[n] for n in ("weights_bytes", "reference_model_bytes", "gradients_bytes", "optimizer_bytes")
    )
    assert awake["total_bytes"] == state + awake["activations_bytes"] + engine
    assert asleep["total_bytes"] == state + max(asleep["activations_bytes"], engine)
    assert awake["total_bytes"] > hf["total_bytes"]
