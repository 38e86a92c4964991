"""Which models a job may load, on the real API and PostgreSQL: a hub id or a directory under
GRPO_MODEL_DIRS, never the artifact store (another owner's checkpoints). One refusal whatever is
on disk, on the native route, the OpenAI route and for a reward model; and the worker's own check
before it loads anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.main import create_app
from jobs.db import transaction
from jobs.models import Job
from jobs.settings import Settings
from tests.service.factories import api_key, bearer, job_spec, make_checkpoint, upload
from tests.service.test_openai_api import rft_job, upload_file
from trainer.errors import ModelLoadError


@pytest.fixture
def dataset_id(client) -> str:
    return upload(client).json()["id"]


@pytest.fixture
def bobs_checkpoint(client, settings) -> Path:
    """A checkpoint of another owner's job, as a worker leaves it in the artifact store."""
    bob = bearer(api_key(settings, owner="bob"))
    job = client.post("/v1/jobs", json=job_spec(upload(client, headers=bob).json()["id"]), headers=bob).json()
    return settings.artifact_dir / make_checkpoint(settings, job["id"], 1)


def native(client, dataset_id: str, base_model: str) -> tuple[int, dict]:
    response = client.post("/v1/jobs", json=job_spec(dataset_id, base_model))
    return response.status_code, response.json().get("error", {})


def reward_model(client, dataset_id: str, model: str) -> tuple[int, dict]:
    spec = job_spec(dataset_id, reward=[{"type": "exact_match"}, {"type": "reward_model", "model": model}])
    response = client.post("/v1/jobs", json=spec)
    return response.status_code, response.json().get("error", {})


def openai(client, file_id: str, model: str) -> tuple[int, dict]:
    response = client.post("/v1/fine_tuning/jobs", json=rft_job(file_id, model=model))
    return response.status_code, response.json().get("error", {})


def refusal_of(status: int, error: dict, *, param: str, path: str, expected_status: int = 422) -> str:
    """The refusal's message with the refused value taken out (it echoes what the caller sent)."""
    assert status == expected_status and error["param"] == param, error
    assert repr(path) in error["message"] and "GRPO_MODEL_DIRS" in error["message"], error
    return error["message"].replace(repr(path), "PATH")


def test_another_owners_checkpoint_is_refused_alike_whether_it_exists_or_not(
    client, settings, dataset_id, bobs_checkpoint: Path, tmp_path: Path
) -> None:
    assert (bobs_checkpoint / "config.json").is_file()
    missing = bobs_checkpoint.with_name("step-000002")
    link = tmp_path / "innocent-model"  # in an allowed directory, but leading into the artifact store
    link.symlink_to(bobs_checkpoint)
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    paths = [
        bobs_checkpoint,
        missing,
        link,
        not_a_model,
        Path("/etc"),
        Path("/no/such/dir"),
        tmp_path / "a-file" / "x",
        Path("/etc/passwd/x"),
    ]
    (tmp_path / "a-file").write_text("not a directory")
    file_id = upload_file(client).json()["id"]

    messages = set()
    for path in map(str, paths):
        messages.add(refusal_of(*native(client, dataset_id, path), param="base_model", path=path))
        messages.add(refusal_of(*reward_model(client, dataset_id, path), param="reward[1].model", path=path))
        openai_message = refusal_of(
            *openai(client, file_id, path), param="model", path=path, expected_status=400
        )
        messages.add(
            openai_message.removeprefix("model: ")
        )  # OpenAI's errors say the param in the message too
    assert messages == {
        "PATH is neither a Hugging Face hub id (org/name) nor a model directory (with a config.json) "
        "under one this server allows (its operator lists them in GRPO_MODEL_DIRS)"
    }
    assert client.get("/v1/jobs").json()["data"] == []


@pytest.mark.parametrize(
    "hub_id",
    [
        "x/..",
        "..",
        ".",
        "x/.",
        "../x",
        "a/b/c",
        "-a/b",
        "a./b",
        "a--b",
        "a..b",
        "a/b.git",
        "a" * 97,
        "org/" + "a" * 97,
        "a b",
        "a/",
    ],
)
def test_what_is_not_a_hub_id_is_refused_as_one(client, dataset_id, hub_id: str) -> None:
    status, error = native(client, dataset_id, hub_id)
    assert status == 422 and error["param"] == "base_model" and "GRPO_MODEL_DIRS" in error["message"], error


def test_a_hub_id_is_one_whatever_the_apis_current_directory_holds(
    client, settings, dataset_id, bobs_checkpoint: Path, tiny_model: Path, tmp_path: Path, monkeypatch
) -> None:
    """The API never looks a hub id up on its disk: were it refused (or estimated from a local
    config.json) when ``./org/name`` exists, the answer would tell a tenant which paths exist."""
    monkeypatch.chdir(bobs_checkpoint.parents[1])
    there, absent = "checkpoints/step-000001", "checkpoints/step-000009"
    assert Path(there).is_dir() and not Path(absent).exists()
    for hub_id in (bobs_checkpoint.name, there, absent):
        assert native(client, dataset_id, hub_id)[0] == 201, hub_id
        assert reward_model(client, dataset_id, hub_id)[0] == 201, hub_id

    # a real model of that name here, outside GRPO_MODEL_DIRS: a hub id, estimated as an absent one
    narrowed = settings.model_copy(update={"model_dirs": [tmp_path / "models"]})
    monkeypatch.chdir(tiny_model.parent)
    with TestClient(create_app(narrowed, send=lambda job_id: None), headers=dict(client.headers)) as other:
        estimates = [
            other.post("/v1/jobs", params={"dry_run": "true"}, json=job_spec(dataset_id, name)).json()
            for name in (tiny_model.name, "no-such-model")
        ]
    assert estimates[0]["memory"] is None and estimates[0]["notes"] == estimates[1]["notes"], estimates


def test_a_hub_id_that_is_also_an_allowed_model_directory_is_refused_asking_for_a_path(
    client, settings, dataset_id, tiny_model: Path, tmp_path: Path, monkeypatch
) -> None:
    """``GRPO_MODEL_DIRS=models`` and ``models/qwen``, as loaded before hub ids were read from the
    text alone: refused when the job is created, naming the field and the path to write instead,
    never accepted as a hub id that the worker would then refuse as shadowed. It tells a tenant
    nothing they could not learn by loading it; a hub id that is not such a directory stays one."""
    import shutil

    cwd = tmp_path / "api-cwd"
    shutil.copytree(tiny_model, cwd / "models" / "qwen")
    (cwd / "other" / "qwen").mkdir(parents=True)  # a model of a hub id's name, outside the allowed
    shutil.copy(tiny_model / "config.json", cwd / "other" / "qwen" / "config.json")
    monkeypatch.chdir(cwd)
    relative = settings.model_copy(update={"model_dirs": [Path("models")]})
    with TestClient(create_app(relative, send=lambda job_id: None), headers=dict(client.headers)) as other:
        file_id = upload_file(other).json()["id"]
        dry_run = other.post("/v1/jobs", params={"dry_run": "true"}, json=job_spec(dataset_id, "models/qwen"))
        refusals = [
            (native(other, dataset_id, "models/qwen"), 422, "base_model"),
            (reward_model(other, dataset_id, "models/qwen"), 422, "reward[1].model"),
            (openai(other, file_id, "models/qwen"), 400, "model"),
            ((dry_run.status_code, dry_run.json().get("error", {})), 422, "base_model"),
        ]
        for (status, error), want_status, param in refusals:
            assert (status, error.get("param")) == (want_status, param), error
            assert "'models/qwen'" in error["message"] and "'./models/qwen'" in error["message"], error
            assert "hub id" in error["message"] and "absolute path" in error["message"], error

        # written as a path, it is the local model: accepted, estimated from its config.json
        for path in ("./models/qwen", str(cwd / "models" / "qwen")):
            assert native(other, dataset_id, path)[0] == 201, path
            estimate = other.post("/v1/jobs", params={"dry_run": "true"}, json=job_spec(dataset_id, path))
            assert estimate.json()["memory"] is not None, estimate.json()
        # hub ids that name no allowed directory: accepted alike, whether a path of that name exists
        for hub_id in ("other/qwen", "models/absent", "org/qwen"):
            assert native(other, dataset_id, hub_id)[0] == 201, hub_id


@pytest.mark.parametrize("field", ["base_model", "reward_model"])
def test_the_worker_refuses_a_hub_id_that_its_current_directory_shadows(
    client, settings, dataset_id, tiny_model: Path, tmp_path: Path, monkeypatch, field: str
) -> None:
    """``from_pretrained("org/model")`` loads ``./org/model`` when that exists, not the hub's
    repository: the worker about to load it refuses the job, saying why, before loading anything."""
    from worker.runner import claim_and_run

    if field == "base_model":
        spec, param = job_spec(dataset_id, "org/model"), "base_model"
    else:
        reward = [{"type": "exact_match"}, {"type": "reward_model", "model": "org/model"}]
        spec, param = job_spec(dataset_id, str(tiny_model), reward=reward), "reward[1].model"
    job = client.post("/v1/jobs", json=spec).json()
    assert job["status"] == "queued", job
    cwd = tmp_path / "worker-cwd"
    (cwd / "org").mkdir(parents=True)
    (cwd / "org" / "model").symlink_to(tiny_model)  # a real model there, which would train
    monkeypatch.chdir(cwd)

    claim_and_run(job["id"], settings=settings, worker="test-worker")

    ended = client.get(f"/v1/jobs/{job['id']}").json()
    assert ended["status"] == "failed", ended
    reason = ended["failure_reason"]
    assert reason.startswith(f"{param}: 'org/model' is a Hugging Face hub id"), reason
    assert "current directory" in reason, reason
    assert not (settings.job_dir(job["id"]) / "checkpoints").exists()  # nothing was trained or saved


def test_the_inference_worker_refuses_a_lora_base_model_that_its_current_directory_shadows(
    client, settings, dataset_id, tiny_model: Path, tmp_path: Path, monkeypatch
) -> None:
    """A LoRA checkpoint is served on its job's base model: a hub id shadowed by a path in the
    inference worker's current directory is not loaded; the asker is told to ask the operator,
    whose log says why."""
    from worker.inference import WarmModels, answer, checkpoint_source

    job = client.post("/v1/jobs", json=job_spec(dataset_id, "org/model")).json()
    make_checkpoint(settings, job["id"], 1, kind="adapter")
    request = {"job_id": job["id"], "step": 1}
    assert checkpoint_source(request, settings).base_model == "org/model"  # nothing of that name here

    cwd = tmp_path / "inference-cwd"
    (cwd / "org").mkdir(parents=True)
    (cwd / "org" / "model").symlink_to(tiny_model)
    monkeypatch.chdir(cwd)
    with pytest.raises(ModelLoadError, match="'org/model' is a Hugging Face hub id"):
        checkpoint_source(request, settings)
    error = answer(request, settings=settings, models=WarmModels(1))["error"]
    assert error["code"] == "inference_unavailable" and "org/model" not in error["message"], error


@pytest.mark.parametrize("hub_id", ["gpt2", "Qwen/Qwen2.5-0.5B-Instruct", "org_1/model.v2-final", "a" * 96])
def test_hub_ids_are_accepted(client, dataset_id, hub_id: str) -> None:
    assert native(client, dataset_id, hub_id)[0] == 201


def test_paths_the_disk_cannot_answer_for_are_a_4xx(client, dataset_id, settings, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    (locked / "model").mkdir(parents=True)
    (locked / "model" / "config.json").write_text("{}")
    locked.chmod(0)  # (root reads it anyway; the paths below fail however the tests run)
    try:
        long_name = str(tmp_path / ("a" * 300))  # a name longer than a file system allows: ENAMETOOLONG
        long_path = "/" + "/".join(["b" * 200] * 25)  # 5000 characters
        cases = [
            (native, long_name, "base_model"),
            (reward_model, long_path, "reward[1].model"),
            (reward_model, long_name, "reward[1].model"),
        ]
        if not (locked / "model" / "config.json").exists():  # not root: a PermissionError
            cases.append((native, str(locked / "model"), "base_model"))
        for route, path, param in cases:
            status, error = route(client, dataset_id, path)
            assert status == 422 and error["param"] == param and "GRPO_MODEL_DIRS" in error["message"], error
    finally:
        locked.chmod(0o755)


def test_a_model_directory_the_operator_allows_is_accepted(
    client, dataset_id, tiny_model: Path, settings
) -> None:
    assert any(tiny_model.is_relative_to(directory) for directory in settings.model_dirs)
    assert native(client, dataset_id, str(tiny_model))[0] == 201
    assert reward_model(client, dataset_id, str(tiny_model))[0] == 201
    assert openai(client, upload_file(client).json()["id"], str(tiny_model))[0] == 200


@pytest.mark.parametrize(
    "config",
    [
        {"architectures": ["BertForMaskedLM"], "model_type": "bert"},
        {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True},
        {"architectures": ["Qwen2ForSequenceClassification"], "model_type": "qwen2"},
        {"architectures": ["LlamaModel"], "model_type": "llama"},
    ],
    ids=["masked-lm", "encoder-decoder", "classifier", "no-head"],
)
def test_a_base_model_whose_config_shows_no_causal_lm_head_is_refused(
    client, dataset_id, tmp_path_factory, config: dict
) -> None:
    """Read from config.json alone (the API never imports torch): transformers would load these
    with a head they lack, or not at all, and the job would train nothing or fail later."""
    import json

    model = tmp_path_factory.mktemp("not-causal") / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    (architecture,) = config["architectures"]
    for (status, error), want in (
        (native(client, dataset_id, str(model)), (422, "base_model")),
        (openai(client, upload_file(client).json()["id"], str(model)), (400, "model")),
    ):
        assert (status, error["param"]) == want, error
        assert architecture in error["message"] and "ForCausalLM" in error["message"], error
    # a reward model is a classifier by design: the same directory is a valid reward_model
    assert reward_model(client, dataset_id, str(model))[0] == 201
    # a causal LM's config (and one that names no architecture) passes
    (model / "config.json").write_text(
        json.dumps({**config, "architectures": ["LlamaForCausalLM"], "is_encoder_decoder": False})
    )
    assert native(client, dataset_id, str(model))[0] == 201
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert native(client, dataset_id, str(model))[0] == 201


def test_a_directory_is_allowed_only_under_the_operators(
    client, dataset_id, tiny_model: Path, settings, tmp_path: Path
) -> None:
    narrowed = settings.model_copy(update={"model_dirs": [tmp_path / "models"]})
    with TestClient(create_app(narrowed, send=lambda job_id: None), headers=dict(client.headers)) as other:
        refusal_of(*native(other, dataset_id, str(tiny_model)), param="base_model", path=str(tiny_model))


@pytest.mark.parametrize("field", ["base_model", "reward_model"])
def test_the_worker_refuses_a_stored_spec_outside_the_model_dirs(
    client, settings, dataset_id, tiny_model: Path, bobs_checkpoint: Path, field: str
) -> None:
    """A job stored before the settings changed (or written past the API) names another owner's
    checkpoint: the worker's run refuses it before loading, the job fails with the API's message."""
    from worker.runner import claim_and_run

    job = client.post("/v1/jobs", json=job_spec(dataset_id, str(tiny_model))).json()
    path = str(bobs_checkpoint)
    if field == "base_model":
        message = native(client, dataset_id, path)[1]["message"]
        spec = job_spec(dataset_id, path)
    else:
        message = reward_model(client, dataset_id, path)[1]["message"]
        spec = job_spec(dataset_id, str(tiny_model), reward=[{"type": "reward_model", "model": path}])
    with transaction(settings.database_url) as session:
        session.execute(
            update(Job).where(Job.id == job["id"]).values(spec=spec, base_model=spec["base_model"])
        )

    claim_and_run(job["id"], settings=settings, worker="test-worker")

    ended = client.get(f"/v1/jobs/{job['id']}").json()
    param = "base_model" if field == "base_model" else "reward[0].model"
    assert ended["status"] == "failed" and ended["failure_reason"] == f"{param}: {message}", ended
    assert not (settings.job_dir(job["id"]) / "checkpoints").exists()  # nothing was trained or saved


def test_the_setting_reads_comma_separated_directories_and_defaults_to_the_data_dirs(
    monkeypatch, tmp_path
) -> None:
    monkeypatch.setenv("GRPO_MODEL_DIRS", "/srv/models, /mnt/weights,")
    assert Settings(data_dir=tmp_path).model_dirs == [Path("/srv/models"), Path("/mnt/weights")]
    for unset in ("", " "):  # compose passes an unset variable as ""
        monkeypatch.setenv("GRPO_MODEL_DIRS", unset)
        assert Settings(data_dir=tmp_path).model_dirs == [tmp_path / "models"]
    monkeypatch.delenv("GRPO_MODEL_DIRS")
    assert Settings(data_dir=tmp_path).model_dirs == [tmp_path / "models"]
