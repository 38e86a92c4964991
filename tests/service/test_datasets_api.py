"""POST/GET /v1/datasets on PostgreSQL: uploads are checked line by line; a bad one leaves nothing."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.service.factories import api_key, arithmetic_rows, bearer, jsonl, upload
from trainer.data import RowFile


def stored_files(settings) -> list[str]:
    return sorted(p.name for p in settings.datasets_dir.glob("*")) if settings.datasets_dir.exists() else []


def test_upload_reports_rows_fields_and_hash(client, settings) -> None:
    body = jsonl(
        arithmetic_rows(5) + [{"prompt": [{"role": "user", "content": "hi"}], "answer": "x", "extra": 1}]
    )
    response = upload(client, content=body, name="arith.jsonl")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["id"].startswith("ds_")
    assert (dataset["name"], dataset["rows"], dataset["bytes"]) == ("arith.jsonl", 6, len(body))
    assert dataset["sha256"] == hashlib.sha256(body).hexdigest()
    assert dataset["fields"] == ["answer", "prompt"]  # "extra" is not in every row
    assert settings.dataset_path(dataset["id"]).read_bytes() == body
    assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset


@pytest.mark.parametrize("route", ["/v1/datasets", "/v1/files"])
def test_a_file_starting_with_a_byte_order_mark_and_a_blank_line_is_read(client, route) -> None:
    body = b'\xef\xbb\xbf\r\n{"prompt": "a"}\r\n{"prompt": "b"}\r\n'
    data = {"purpose": "fine-tune"} if route == "/v1/files" else {}
    response = client.post(route, files={"file": ("bom.jsonl", body)}, data=data)
    assert response.status_code in (200, 201), response.text
    if route == "/v1/datasets":
        assert response.json()["rows"] == 2


def test_blank_lines_are_skipped(client) -> None:
    response = upload(client, content=b'{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert response.status_code == 201 and response.json()["rows"] == 2


def test_chat_format_rows_are_accepted_with_their_messages_as_the_prompt(client, settings) -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Answer with a number."},
                {"role": "user", "content": f"{i} + 1?"},
                {"role": "assistant", "content": str(i + 1)},
            ],
            "answer": str(i + 1),
        }
        for i in range(3)
    ]
    response = upload(client, content=jsonl(rows))
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["rows"] == 3 and dataset["fields"] == ["answer", "completion", "messages", "prompt"]
    assert settings.dataset_path(dataset["id"]).read_bytes() == jsonl(rows)  # stored as uploaded


def test_a_row_without_prompt_or_messages_is_told_about_both(client) -> None:
    error = upload(client, content=b'{"question": "1+1?"}\n').json()["error"]
    assert "missing 'prompt'" in error["message"] and "may give 'messages' instead" in error["message"]


@pytest.mark.parametrize(
    ("content", "lines", "says"),
    [
        (b'{"prompt": "ok"}\n{"prompt": "ok",\nnot json\n', [2, 3], "not valid JSON"),
        (b'{"prompt": "ok"}\n{"answer": "4"}\n', [2], "missing 'prompt'"),
        (b'{"prompt": ""}\n', [1], "'prompt' is empty"),
        (b'{"prompt": [{"role": "user"}]}\n', [1], "message"),
        (b"[1, 2]\n", [1], "expected a JSON object"),
        # a lone assistant message was taken as the prompt: the prompt is the messages before it
        (
            b'{"prompt": "ok"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n',
            [2],
            "line 2: 'messages' holds only an assistant message",
        ),
        (b'{"prompt": [{"role": "bogus", "content": "x"}]}\n', [1], "'prompt'[0] has the role 'bogus'"),
    ],
)
def test_bad_lines_are_listed_and_nothing_is_stored(client, settings, content, lines, says) -> None:
    response = upload(client, content=content)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_dataset" and error["param"] == "file"
    assert [d["line"] for d in error["details"]] == lines
    assert says in error["message"]
    assert client.get("/v1/datasets").json()["data"] == []
    assert stored_files(settings) == []


CHAT_MESSAGES = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "2 + 2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.mark.parametrize("route", ["/v1/datasets", "/v1/files"])
def test_a_row_with_both_prompt_and_messages_is_refused_naming_the_line(client, settings, route) -> None:
    """The user who wrote both meant one of them: which, only they know. Kept silently, the
    'prompt' would have trained on without the chat (and on /v1/files, without a word either)."""
    rows = [{"messages": CHAT_MESSAGES}, {"prompt": "2 + 2?", "messages": CHAT_MESSAGES, "answer": "4"}]
    response = client.post(
        route, files={"file": ("d.jsonl", jsonl(rows), "application/jsonl")}, data={"purpose": "fine-tune"}
    )
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert "line 2: 'prompt' and 'messages' are both given, and give different prompts" in error["message"]
    assert [d["line"] for d in error["details"]] == [2]
    assert client.get("/v1/datasets").json()["data"] == [] and stored_files(settings) == []


@pytest.mark.parametrize("route", ["/v1/datasets", "/v1/files"])
def test_a_string_prompt_with_the_chat_it_begins_is_accepted(client, settings, route) -> None:
    """The common shape: the question as 'prompt', and the chat of that one question with its
    answer as 'messages'. The same prompt, whoever reads it: stored as sent, trained on 'prompt'."""
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    rows = [{"prompt": "What is 2+2?", "messages": chat}, {"prompt": "What is 3+3?", "messages": None}]
    response = client.post(
        route, files={"file": ("d.jsonl", jsonl(rows), "application/jsonl")}, data={"purpose": "fine-tune"}
    )
    assert response.status_code in (200, 201), response.text
    stored = RowFile(settings.dataset_path(response.json()["id"]))
    assert [(row["prompt"], row["messages"]) for row in stored] == [
        ("What is 2+2?", chat),
        ("What is 3+3?", None),
    ]
    stored.close()


def test_a_file_of_chat_rows_reads_back_as_the_trainer_reads_it(client, settings) -> None:
    """/v1/files stores each chat row with the prompt its messages give, beside them: no conflict
    when a job's worker reads the file again."""
    response = client.post(
        "/v1/files",
        files={"file": ("d.jsonl", jsonl([{"messages": CHAT_MESSAGES}]), "application/jsonl")},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    rows = RowFile(settings.dataset_path(response.json()["id"]))
    assert [(row["prompt"], row["messages"], row["completion"]) for row in rows] == [
        (CHAT_MESSAGES[:2], CHAT_MESSAGES, "4")
    ]
    rows.close()


@pytest.mark.parametrize(
    ("content", "says"), [(b"", "no rows"), (b"\n\n", "no rows"), (b"\xff\xfe\x00", "UTF-8")]
)
def test_empty_or_binary_upload_is_rejected(client, settings, content, says) -> None:
    response = upload(client, content=content)
    assert response.status_code == 422 and says in response.json()["error"]["message"]
    assert stored_files(settings) == []


def test_upload_over_the_size_limit_is_413(settings, sent) -> None:
    settings.max_dataset_bytes = 100
    with TestClient(create_app(settings, send=sent.append), headers=bearer(api_key(settings))) as client:
        response = upload(client, rows=arithmetic_rows(20))
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
        assert client.get("/v1/datasets").json()["data"] == []
    assert stored_files(settings) == []


def test_upload_without_a_file_is_422(client) -> None:
    response = client.post("/v1/datasets", files={"name": (None, b"x")})  # multipart, with no file part
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "file"


def test_list_is_newest_first_and_paginated(client) -> None:
    ids = [upload(client, name=f"{i}.jsonl").json()["id"] for i in range(3)]
    first = client.get("/v1/datasets", params={"limit": 2}).json()
    assert [d["id"] for d in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    rest = client.get("/v1/datasets", params={"limit": 2, "after": first["data"][-1]["id"]}).json()
    assert [d["id"] for d in rest["data"]] == [ids[0]] and rest["has_more"] is False


@pytest.mark.parametrize("limit", [0, 101, "x"])
def test_list_rejects_a_bad_limit(client, limit) -> None:
    response = client.get("/v1/datasets", params={"limit": limit})
    assert response.status_code == 422 and response.json()["error"]["param"] == "limit"


def test_unknown_dataset_is_404(client) -> None:
    response = client.get("/v1/datasets/ds_nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "dataset_not_found"
