"""Dataset uploads within bounded memory, on PostgreSQL: a line's size, nesting and number of
values are limits checked on its bytes before it is parsed; text PostgreSQL cannot store is
refused naming the line; an upload a killed API process left behind is removed at startup."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from jobs.datasets import LEFTOVER_UPLOAD_AGE_S, UPLOAD_PREFIX
from tests.service.factories import api_key, bearer, upload
from tests.service.faults import ApiProcess

MB = 1 << 20


def stored_files(settings) -> list[str]:
    return sorted(p.name for p in settings.datasets_dir.glob("*")) if settings.datasets_dir.exists() else []


def refusal(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == "file", error
    return error


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def amplifying_line(size: int) -> bytes:
    """One JSON line of ``size`` bytes that ``json.loads`` turns into ~25 times as much memory."""
    return b'{"prompt": "x", "pad": [' + b"[]," * ((size - 30) // 3) + b"[]]}\n"


# --- memory ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "line_limit", "status", "says"),
    [
        # one 20 MB line: refused once GRPO_MAX_DATASET_LINE_BYTES of it is read
        ("/v1/datasets", None, 413, "GRPO_MAX_DATASET_LINE_BYTES"),
        # the same line under a line limit raised past it: refused by counting its values, unparsed
        ("/v1/files", 24 * MB, 400, "GRPO_MAX_DATASET_ROW_VALUES"),
    ],
)
def test_an_amplifying_upload_is_refused_within_bounded_memory(
    settings, route, line_limit, status, says
) -> None:
    # Before the limits, checking this 20 MB line took ~500 MB: json.loads built ~7 million lists.
    if line_limit is not None:
        settings = settings.model_copy(update={"max_dataset_line_bytes": line_limit})
    key = api_key(settings)
    api = ApiProcess(settings).start()
    try:
        assert api.process is not None
        with httpx.Client(base_url=api.url, headers=bearer(key), timeout=300) as http:

            def send(content: bytes) -> httpx.Response:
                return http.post(
                    route,
                    files={"file": ("big.jsonl", content, "application/jsonl")},
                    data={"purpose": "fine-tune"} if route == "/v1/files" else None,
                )

            assert send(b'{"messages": [{"role": "user", "content": "warm up"}]}\n').status_code < 300
            before = peak_rss_mb(api.process.pid)
            content = amplifying_line(20 * MB)
            response = send(content)
            growth = peak_rss_mb(api.process.pid) - before
        assert response.status_code == status, response.text
        assert says in response.json()["error"]["message"] and "line 1" in response.json()["error"]["message"]
        del content
        # The upload itself is spooled to disk; checking holds one line (at most twice, briefly).
        assert growth < 150, f"the API's peak memory grew by {growth:.0f} MiB checking a 20 MiB upload"
    finally:
        api.stop()


# --- limits, each a 4xx naming the line --------------------------------------------------------


def test_a_line_over_the_line_limit_is_413_naming_the_line(settings, sent) -> None:
    settings.max_dataset_line_bytes = 1000
    with TestClient(create_app(settings, send=sent.append), headers=bearer(api_key(settings))) as client:
        ok = b'{"prompt": "' + b"a" * 900 + b'"}\n'
        assert upload(client, content=ok * 3).status_code == 201
        long = b'{"prompt": "' + b"a" * 5000 + b'"}\n'
        error = refusal(upload(client, content=ok + long + ok), 413, "payload_too_large")
        assert "line 2" in error["message"] and "1000 bytes" in error["message"]
        assert "GRPO_MAX_DATASET_LINE_BYTES" in error["message"]
        assert error["details"][0]["line"] == 2
        # a line of exactly the limit, whatever its ending, passes
        exact = b'{"prompt": "' + b"a" * (1000 - 14) + b'"}'
        assert len(exact) == 1000
        assert upload(client, content=exact + b"\r\n" + exact + b"\n" + exact).status_code == 201
    assert len(stored_files(settings)) == 2  # the two accepted uploads, no leftover


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b'{"prompt": "x", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "GRPO_MAX_DATASET_ROW_VALUES"),
        (b"[" * 100_000, "GRPO_MAX_DATASET_ROW_VALUES"),  # unbalanced too
        (b'{"prompt": "x", "deep": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper than 32 levels"),
        (b'{"prompt": "x", "deep": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}", "GRPO_MAX_DATASET_DEPTH"),
        (b'{"prompt": "x", "many": [' + b"[]," * 20_000 + b"[]]}", "more than 10000 JSON values"),
        (b'{"prompt": "x", "many": [' + b'"a",' * 20_000 + b'"a"]}', "GRPO_MAX_DATASET_ROW_VALUES"),
        # int() refuses > 4300 digits; its advice (sys.set_int_max_str_digits()) is not the user's
        (
            b'{"prompt": "x", "n": ' + b"7" * 5000 + b"}",
            "'n' is an integer of 5000 digits, more than the 4300",
        ),
    ],
)
def test_deep_or_crowded_rows_are_422_naming_the_line(client, settings, line, says) -> None:
    good = b'{"prompt": "fine"}\n'
    error = refusal(upload(client, content=good + line + b"\n" + good), 422, "invalid_dataset")
    assert error["details"][0]["line"] == 2 and says in error["details"][0]["message"], error
    assert "sys." not in error["message"], error
    assert stored_files(settings) == []


@pytest.mark.parametrize("route", ["/v1/datasets", "/v1/files"])
def test_numbers_json_does_not_have_are_refused_naming_the_line_and_field(client, settings, route) -> None:
    """Python's parser reads NaN, Infinity and 1e400 (as inf): such a row was stored, and
    ``GET /v1/files/{id}/content`` then served JSON no other reader takes."""
    rows = [
        b'{"prompt": "a", "answer": NaN}',
        b'{"prompt": "a", "answer": Infinity}',
        b'{"prompt": "a", "scores": [1, -Infinity]}',
        b'{"prompt": "a", "answer": 1e400}',
        b'{"prompt": "fine", "answer": 1e300}',
    ]
    body = b"\n".join(rows) + b"\n"
    if route == "/v1/files":
        response = client.post(
            route, files={"file": ("t.jsonl", body, "application/jsonl")}, data={"purpose": "fine-tune"}
        )
        error = refusal(response, 400, "invalid_dataset")
    else:
        error = refusal(upload(client, content=body), 422, "invalid_dataset")
    assert [(d["line"], d["message"].split(",")[0]) for d in error["details"]] == [
        (1, "'answer' is NaN"),
        (2, "'answer' is Infinity"),
        (3, "'scores'[1] is -Infinity"),
        (4, "'answer' is 1e400"),
    ], error["details"]
    assert stored_files(settings) == []


def test_only_structure_counts_not_what_strings_hold(client) -> None:
    # brackets, commas and escaped quotes inside strings are not structure
    row = (
        b'{"prompt": "' + b"[[[[{{{{,,,," * 5000 + b'\\"[[[", "tests": ["' + b"\\\\" * 100 + b'"], '
        b'"deep": ' + b"[" * 30 + b"]" * 30 + b"}\n"
    )
    response = upload(client, content=row)
    assert response.status_code == 201, response.text
    deep = (
        b'{"prompt": "[[[[,,,,", "deep": ' + b"[" * 1000 + b"]" * 1000 + b"}\n"
    )  # once a RecursionError: a 500
    assert (
        "nested deeper than 32"
        in refusal(upload(client, content=row + deep), 422, "invalid_dataset")["message"]
    )


# --- text PostgreSQL cannot store -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (rb'{"prompt": "what is 1+1?\u0000"}', "'prompt' contains a NUL character"),
        (rb'{"prompt": [{"role": "user", "content": "a\u0000"}]}', "'prompt'[0]['content'] contains a NUL"),
        (rb'{"prompt": "fine", "answer": "\u0000"}', "'answer' contains a NUL"),
        (rb'{"prompt": "fine", "meta": {"tags": ["ok", "\u0000"]}}', "'meta'['tags'][1] contains a NUL"),
        (rb'{"prompt": "fine", "a\u0000b": 1}', "the row has a key that contains a NUL"),
        (rb'{"prompt": "fine", "meta": {"\u0000": 1}}', "'meta' has a key that contains a NUL"),
        (rb'{"prompt": "fine", "answer": "\ud800"}', "'answer' contains a lone UTF-16 surrogate (\\ud800)"),
        (rb'{"prompt": "fine", "\udfff": "x"}', "the row has a key that contains a lone UTF-16 surrogate"),
    ],
)
def test_text_the_database_cannot_store_is_422_naming_the_line_and_field(
    client, settings, line, says
) -> None:
    # A NUL used to be accepted here, and the job failed later on INSERT INTO job_samples.
    good = b'{"prompt": "fine"}\n'
    error = refusal(upload(client, content=good + good + line + b"\n"), 422, "invalid_dataset")
    assert error["details"] == [{"line": 3, "message": error["details"][0]["message"]}]
    assert says in error["details"][0]["message"], error
    assert says in error["message"] and "line 3" in error["message"]
    assert stored_files(settings) == [] and client.get("/v1/datasets").json()["data"] == []


def test_text_that_only_looks_like_a_nul_is_kept(client) -> None:
    row = rb'{"prompt": "print(\"\\u0000\")", "pair": "\ud83d\ude00", "tab": "\u0009"}' + b"\n"
    nul = rb'{"prompt": "print(\"\\\u0000\")"}' + b"\n"  # an escaped backslash, then a NUL
    assert (
        "line 2: 'prompt' contains a NUL"
        in refusal(upload(client, content=row + nul), 422, "invalid_dataset")["message"]
    )
    response = upload(client, content=row)
    assert response.status_code == 201, response.text
    dataset = response.json()
    content = client.get(f"/v1/files/{dataset['id']}/content")
    assert content.content == row


def test_the_openai_files_route_checks_the_same_limits(client, settings) -> None:
    settings.max_dataset_line_bytes = 8000

    def post(content: bytes) -> httpx.Response:
        return client.post(
            "/v1/files",
            files={"file": ("t.jsonl", content, "application/jsonl")},
            data={"purpose": "fine-tune"},
        )

    message = b'{"messages": [{"role": "user", "content": "hi"}], "reference_answer": "1"}\n'
    assert post(message).status_code == 200
    nul = rb'{"messages": [{"role": "user", "content": "hi\u0000"}], "reference_answer": "1"}' + b"\n"
    error = refusal(post(message + nul), 400, "invalid_dataset")
    assert "line 2" in error["message"] and "'messages'[0]['content'] contains a NUL" in error["message"]
    surrogate = rb'{"messages": [{"role": "user", "content": "\udc00"}]}' + b"\n"
    assert "lone UTF-16 surrogate" in refusal(post(surrogate), 400, "invalid_dataset")["message"]
    deep = b'{"messages": ' + b"[" * 3500 + b"]" * 3500 + b"}\n"
    assert "line 1" in refusal(post(deep), 400, "invalid_dataset")["message"]
    deep_unbalanced = b'{"messages": [' + b"[" * 3000 + b"}" * 3000 + b"}\n"  # once a RecursionError: a 500
    assert "line 1" in refusal(post(deep_unbalanced), 400, "invalid_dataset")["message"]
    long = b'{"messages": [{"role": "user", "content": "' + b"a" * 9000 + b'"}]}\n'
    assert "GRPO_MAX_DATASET_LINE_BYTES" in refusal(post(message + long), 413, "payload_too_large")["message"]
    assert stored_files(settings) and all(
        not name.startswith(UPLOAD_PREFIX) for name in stored_files(settings)
    )


# --- leftovers -------------------------------------------------------------------------------------


def test_uploads_left_by_a_killed_api_are_removed_at_startup(settings, sent) -> None:
    settings.datasets_dir.mkdir(parents=True)
    stale = settings.datasets_dir / f"{UPLOAD_PREFIX}killed.jsonl"
    stale.write_bytes(b'{"prompt": "half a line')
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    # another API process's upload in progress: it writes as it checks, so its file is recent
    live = settings.datasets_dir / f"{UPLOAD_PREFIX}live.jsonl"
    live.write_bytes(b'{"prompt": "being checked"}\n')
    recent = time.time() - LEFTOVER_UPLOAD_AGE_S / 2
    os.utime(live, (recent, recent))
    kept = settings.datasets_dir / "ds_kept.jsonl"  # a dataset, however old, is not an upload
    kept.write_bytes(b'{"prompt": "x"}\n')
    os.utime(kept, (an_hour_ago, an_hour_ago))

    with TestClient(create_app(settings, send=sent.append), headers=bearer(api_key(settings))) as client:
        assert client.get("/healthz").status_code == 200
    assert not stale.exists()
    assert live.exists() and kept.exists()
