"""A dataset none of whose prompts fits max_prompt_length: the trainer refuses it at the job's start
(``trainer.prompts.check_a_prompt_fits``). Where the API can be certain (the model's tokenizer.json
counted every row) the job is refused when created, a 422 naming the field, the dry run too;
where it cannot (a sample of a larger dataset, or 4 characters a token for want of a tokenizer)
the job is created and the estimate says it will fail unless the guess is wrong."""

from __future__ import annotations

import json
from pathlib import Path

from jobs.estimate import PROMPT_SAMPLE_ROWS
from tests.service.factories import job_spec, upload


def rows(n: int, prompt: str = "Say a{}:") -> list[dict]:
    return [{"prompt": prompt.format(i % 10), "answer": "a"} for i in range(n)]  # 7 characters, 7 tokens


def dry_run(client, spec: dict):
    return client.post("/v1/jobs", params={"dry_run": "true"}, json=spec)


def test_every_prompt_longer_by_the_tokenizer_is_refused_naming_max_prompt_length(
    client, sent, tiny_model
) -> None:
    dataset = upload(client, rows(16)).json()["id"]
    spec = job_spec(dataset, str(tiny_model), hyperparameters={"max_prompt_length": 4})
    for response in (client.post("/v1/jobs", json=spec), dry_run(client, spec)):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "hyperparameters.max_prompt_length"
        assert (
            error["message"].startswith(
                "every prompt of the dataset is longer than max_prompt_length (4 tokens): the shortest is 7 "
                "tokens by the model's tokenizer"
            )
            and "Raise max_prompt_length to at least 7" in error["message"]
        )
    assert client.get("/v1/jobs").json()["data"] == [] and sent == []

    # one prompt that fits: created; the estimate warns of the others' left truncation
    fits = upload(client, rows(15) + [{"prompt": "a", "answer": "a"}]).json()["id"]
    spec = job_spec(fits, str(tiny_model), hyperparameters={"max_prompt_length": 4})
    [warning] = dry_run(client, spec).json()["warnings"]
    assert warning.startswith("94% of the sampled prompts are longer than max_prompt_length (4 tokens")
    assert client.post("/v1/jobs", json=spec).status_code == 201


def test_a_sample_of_a_larger_dataset_warns_that_the_job_will_fail(client, tiny_model) -> None:
    dataset = upload(client, rows(PROMPT_SAMPLE_ROWS + 1)).json()["id"]  # one row beyond the sample
    spec = job_spec(dataset, str(tiny_model), hyperparameters={"max_prompt_length": 4})
    estimate = dry_run(client, spec).json()
    assert estimate["tokens"]["prompts_truncated"] == 1.0, estimate
    [warning] = estimate["warnings"]
    assert warning.startswith(
        f"every one of the dataset's first {PROMPT_SAMPLE_ROWS} prompts is longer than max_prompt_length "
        "(4 tokens; the shortest is 7"
    ), warning
    assert "unless a later row is shorter, the job fails when it starts" in warning
    assert "left truncation" not in warning
    assert client.post("/v1/jobs", json=spec).status_code == 201  # row 201 might fit: not refused


def test_the_characters_a_token_guess_never_refuses(client, tmp_path: Path) -> None:
    directory = tmp_path / "models" / "no-tokenizer"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100})
    )
    dataset = upload(client, rows(4, prompt="x" * 40 + "{}")).json()["id"]  # 41 characters: ~11 tokens
    spec = job_spec(dataset, str(directory), hyperparameters={"max_prompt_length": 4})
    [warning] = dry_run(client, spec).json()["warnings"]
    assert warning.startswith(
        "every one of the 4 sampled prompts (the whole dataset) is longer than max_prompt_length (4 "
        "tokens) by a guess of 4 characters a token (the shortest ~11"
    ), warning
    assert "if the model's tokenizer counts as many, the job fails when it starts" in warning
    assert client.post("/v1/jobs", json=spec).status_code == 201
