"""The HTTP layer as the OpenAPI document describes it, on the real API on PostgreSQL: a 405 names
every method its path takes (``Allow``), a body that cannot be decoded or parsed is a documented
400 saying why, one that is not an object is told what it must be, and a NUL in a path or query
parameter is a documented 4xx naming the parameter, never the database's 500. The cases are
generated from the document, so a new route or parameter is covered too."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from tests.service.factories import job_spec, upload

NUL = "\x00"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@pytest.fixture
def settings(settings):
    settings.rate_limit_per_s = 0  # a request per documented method, path and parameter
    return settings


@pytest.fixture
def document(client) -> dict[str, Any]:
    return client.get("/openapi.json").json()


@pytest.fixture
def path_values(client) -> dict[str, str]:
    """Path parameters naming resources that exist, so that a query parameter is read, not
    answered by a 404 first."""
    dataset_id = upload(client).json()["id"]
    created = client.post("/v1/jobs", json=job_spec(dataset_id))
    assert created.status_code == 201, created.text
    return {"job_id": created.json()["id"], "dataset_id": dataset_id, "file_id": dataset_id, "step": "1"}


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield path, method.upper(), operation


def test_a_405_lists_every_method_its_path_takes(client, document) -> None:
    answered = 0
    for path, methods in document["paths"].items():
        documented = {method.upper() for method in methods}
        url = path.format(job_id="job_x", dataset_id="ds_x", file_id="file_x", step=1)
        for method in sorted(set(METHODS) - documented):
            response = client.request(method, url)
            assert response.status_code == 405, (method, url, response.text)
            allowed = {name.strip() for name in response.headers["Allow"].split(",")}
            assert allowed - {"HEAD"} == documented, (method, url, response.headers["Allow"])
            error = response.json()["error"]
            assert error["code"] == "method_not_allowed" and sorted(documented)[0] in error["message"], error
            answered += 1
    assert answered >= 3 * len(document["paths"])


def test_a_body_that_cannot_be_decoded_is_a_documented_400(client, document) -> None:
    with_body = [
        (path, method, operation)
        for path, method, operation in operations(document)
        if "requestBody" in operation
    ]
    assert len(with_body) >= 5, with_body
    for path, method, operation in with_body:
        media_type = next(iter(operation["requestBody"]["content"]))
        if media_type == "application/json":
            sent = {"content": b'{"name": "\xff\xfe"}', "headers": {"Content-Type": "application/json"}}
        else:  # multipart/form-data: no part, no closing boundary
            sent = {
                "content": b"--b\r\nno headers here",
                "headers": {"Content-Type": f"{media_type}; boundary=b"},
            }
        response = client.request(method, path, **sent)
        assert response.status_code == 400, (method, path, response.text)
        assert "400" in operation["responses"], (method, path, sorted(operation["responses"]))
        assert response.json()["error"]["code"] == "invalid_request"


def json_operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, method, operation in operations(document):
        if "application/json" in operation.get("requestBody", {}).get("content", {}):
            yield path, method, operation


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"name": ', "the body is not valid JSON: Expecting value (character 9)"),
        (b'{"name": "\xff\xfe"}', "the body could not be decoded: a JSON body must be UTF-8 text"),
        # each was told "must be UTF-8 text" too; the second leaked Python's sys.set_int_max_str_digits()
        (b"[" * 100_000 + b"]" * 100_000, "the body nests objects and lists too deeply to be read"),
        (b'{"name": ' + b"7" * 5000 + b"}", "a number in the body has more than 4300 digits"),
    ],
    ids=["malformed", "not-utf8", "nested-100000-deep", "5000-digits"],
)
def test_a_body_json_cannot_read_is_a_400_saying_why(client, document, body, says) -> None:
    """Every body that cannot be read as JSON is the documented 400, each with its own reason
    (malformed JSON was a 422 beside the 400 for one that is not UTF-8)."""
    tried = 0
    for path, method, operation in json_operations(document):
        response = client.request(method, path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (method, path, response.text)
        assert "400" in operation["responses"], (method, path, sorted(operation["responses"]))
        error = response.json()["error"]
        assert error["param"] is None and error["message"].startswith(says), (method, path, error)
        assert "sys." not in error["message"], error
        tried += 1
    assert tried >= 4, tried


@pytest.mark.parametrize(
    ("body", "got"), [(b"", "it is empty"), (b"[]", "got an array"), (b"null", "got null")]
)
def test_a_body_that_is_not_an_object_is_told_what_it_must_be(client, document, body, got) -> None:
    """Once "Field required" or "Input should be a valid dictionary", naming nothing: the body
    as a whole has no param (null, as OpenAI has it), so the message says what the body must be."""
    for path, method, operation in json_operations(document):
        response = client.request(method, path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 422), (method, path, response.text)
        assert str(response.status_code) in operation["responses"], (method, path, response.status_code)
        error = response.json()["error"]
        assert error["param"] is None and error["message"].startswith("the body must be a JSON object"), error
        assert error["message"].endswith(f"; {got}"), error
    job = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert job.status_code == 422
    assert (
        job.json()["error"]["message"]
        == f"the body must be a JSON object with base_model, dataset_id and reward; {got}"
    )
    openai = client.post("/v1/fine_tuning/jobs", content=body, headers={"Content-Type": "application/json"})
    assert openai.status_code == 400
    assert (
        openai.json()["error"]["message"]
        == f"the body must be a JSON object with model and training_file; {got}"
    )


def test_a_nul_in_any_path_or_query_parameter_is_a_4xx_naming_it(client, document, path_values) -> None:
    tried = 0
    for path, method, operation in operations(document):
        for parameter in operation.get("parameters", []):
            name, where = parameter["name"], parameter["in"]
            if where not in ("path", "query"):
                continue  # a NUL in a header never reaches the app: HTTP servers refuse it
            values = {**path_values, name: quote(f"a{NUL}b")} if where == "path" else path_values
            response = client.request(
                method, path.format(**values), params={name: f"a{NUL}b"} if where == "query" else None
            )
            assert response.status_code in (400, 422), (method, path, name, response.text)
            assert str(response.status_code) in operation["responses"], (method, path, response.status_code)
            error = response.json()["error"]
            assert error["code"] == "invalid_request" and error["param"] == name, (method, path, error)
            assert error["message"].startswith(f"{name}: "), error
            tried += 1
    assert tried >= 40, tried


@pytest.mark.parametrize("query", [{f"metadata[team{NUL}]": "a"}, {"metadata[team]": f"a{NUL}"}])
def test_a_nul_in_a_metadata_filter_is_a_400_naming_it(client, path_values, query) -> None:
    response = client.get("/v1/fine_tuning/jobs", params=query)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == next(iter(query)).replace(NUL, "\\u0000") and "NUL" in error["message"], error


def test_without_a_nul_the_same_requests_are_served(client, path_values) -> None:
    job_id = path_values["job_id"]
    assert client.get(f"/v1/jobs/{job_id}").json()["id"] == job_id
    assert client.get("/v1/jobs", params={"after": job_id}).status_code == 200
    assert client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "a"}).json()["data"] == []
