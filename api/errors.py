"""One error shape for every failed request: ``{"error": {"code", "message", "param"}}``.

Domain code raises ``jobs.errors`` exceptions; this module alone knows their HTTP status.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Match

from jobs.errors import (
    Conflict,
    InferenceTimedOut,
    InferenceUnavailable,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceError,
    TooManyActiveJobs,
    Unauthenticated,
    UnsupportedMediaType,
)
from jobs.schemas import ErrorOut
from jobs.store import StoreUnavailable
from jobs.text import UNSTORABLE_ERROR, storable_text

log = logging.getLogger(__name__)

STATUS: dict[type[ServiceError], int] = {
    InvalidRequest: 422,
    Unauthenticated: 401,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    RateLimited: 429,
    TooManyActiveJobs: 429,
    InferenceUnavailable: 503,
    InferenceTimedOut: 504,
    StoreUnavailable: 503,  # the object store unreachable: try again later
}
# A 503 for the artifact store out of reach: boto3 has already retried for seconds; a store that
# restarts or fails over is back within a few more, and clients (grpo_client) wait this long.
STORE_RETRY_AFTER_S = 5
HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "param": param}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def status_of(exc: ServiceError) -> int:
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 400


def dotted_path(loc: Sequence[str | int]) -> str | None:
    """``("body", "reward", 0, "type")`` → ``"reward[0].type"``: the field as the client wrote it."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header", "cookie") else list(loc)
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def headers_of(exc: ServiceError) -> dict[str, str] | None:
    if isinstance(exc, Unauthenticated):
        return {"WWW-Authenticate": 'Bearer realm="grpo"'}
    if exc.retry_after_s is not None:  # a 429, or a 409 that a retry resolves: the seconds its message says
        return {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, StoreUnavailable):
        return {"Retry-After": str(STORE_RETRY_AFTER_S)}
    return None


async def service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(status_of(exc), exc.code, exc.message, exc.param, exc.details, headers_of(exc))


def _location(error: Any) -> tuple[str | int, ...]:
    """Where a pydantic error is; text the database cannot store names its place inside the field.
    A location is the client's own keys: one the response could not encode is shown escaped."""
    loc = tuple(error["loc"])
    if error.get("type") == UNSTORABLE_ERROR:
        loc += tuple(error["ctx"]["at"])
    return tuple(storable_text(part) if isinstance(part, str) else part for part in loc)


# pydantic's errors for a body that is not an object at all (empty, null, a list, a string, ...)
NOT_AN_OBJECT = ("missing", "model_attributes_type", "model_type", "dict_type")


def json_kind(value: Any) -> str:
    """What a JSON value is, as a message names it: ``an array``, ``null``, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def body_must_be(request: Request) -> str:
    """``"a JSON object with model and training_file"``: what the route's body must be (its
    model's required fields, as the client writes them)."""
    field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return "a JSON object"
    required = [info.alias or name for name, info in model.model_fields.items() if info.is_required()]
    if not required:
        return "a JSON object"
    listed = required[0] if len(required) == 1 else f"{', '.join(required[:-1])} and {required[-1]}"
    return f"a JSON object with {listed}"


def _problem(error: Any, request: Request) -> dict[str, Any]:
    if error.get("type") == "json_invalid":  # FastAPI's location is ("body", <character offset>)
        return {
            "param": None,
            "message": f"the body is not valid JSON: {error['ctx']['error']} (character {error['loc'][-1]})",
        }
    if tuple(error["loc"]) == ("body",) and error.get("type") in NOT_AN_OBJECT:
        # the body as a whole: no field to name (param null, as OpenAI has it), so say what it must be
        got = "it is empty" if error["type"] == "missing" else f"got {json_kind(error.get('input'))}"
        return {"param": None, "message": f"the body must be {body_must_be(request)}; {got}"}
    return {"param": dotted_path(_location(error)), "message": error["msg"]}


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A 422 naming the first field at fault (and in ``details`` every one); a body that is not
    JSON at all is a 400, as one that cannot be decoded (``http_error``)."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    problems = [_problem(e, request) for e in errors]
    first = problems[0] if problems else {"param": None, "message": "invalid request"}
    message = first["message"] if first["param"] is None else f"{first['param']}: {first['message']}"
    status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
    return error_response(
        status, "invalid_request", message, first["param"], problems if len(problems) > 1 else None
    )


# The nesting every JSON body may have: Python's parser stops at its recursion limit (about 950
# levels for a request; fewer on a deeper call stack), so a client is told a depth that always works.
READABLE_DEPTH = 500


def undecodable_body(cause: BaseException | None) -> str:
    """Why FastAPI could not read a body (its 400 "There was an error parsing the body"), from the
    exception behind it; never that exception's own text (Python's advice is not the client's)."""
    if isinstance(cause, UnicodeDecodeError):
        return "the body could not be decoded: a JSON body must be UTF-8 text"
    if isinstance(cause, RecursionError):
        return (
            f"the body nests objects and lists too deeply to be read: keep it under {READABLE_DEPTH} levels"
        )
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return (
            f"a number in the body has more than {sys.get_int_max_str_digits()} digits; no field "
            "here takes one that large"
        )
    return "the body could not be decoded: send UTF-8 JSON, or a well-formed multipart/form-data form"


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on the request's path (Starlette's 405 names only those of
    the first route that matched the path: ``GET /v1/jobs`` and ``POST /v1/jobs`` are two)."""
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}; see /docs"
    elif exc.status_code == 405 and (allowed := allowed_methods(request)):
        headers["Allow"] = ", ".join(allowed)  # RFC 9110: a 405 lists what the resource supports
        message = f"{request.url.path} does not take {request.method}; it takes {headers['Allow']}"
    elif exc.status_code == 400 and message == "There was an error parsing the body":
        # FastAPI's answer to a body json.loads (or the form parser) cannot read, raised from why
        message = undecodable_body(exc.__cause__)
    return error_response(exc.status_code, code, message, headers=headers or None)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(
        500, "internal_error", "something went wrong on our side; the server log has details"
    )


class OpenAIRoute(APIRoute):
    """A route of the OpenAI-compatible API. The error shape is the same, but a request refused as
    invalid is a 400 (a 422 elsewhere), as OpenAI answers it and its SDK expects
    (``BadRequestError``); the message starts with the param, since the SDK shows the message
    alone; a 409 and a 504 carry ``x-should-retry: false``, or the SDK would retry them, unless
    the answer says when to retry (``Retry-After``: a 409 for an Idempotency-Key in use), when
    they carry ``x-should-retry: true``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_as_openai(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as exc:
                response = await validation_error(request, exc)
            except ServiceError as exc:
                message = exc.message if exc.param is None else f"{exc.param}: {exc.message}"
                response = error_response(
                    status_of(exc), exc.code, message, exc.param, exc.details, headers_of(exc)
                )
            if response.status_code == 422:
                response.status_code = 400
            elif response.status_code in (409, 504):
                # a 504 is a timed-out chat completion: retrying waits as long again
                retry = "retry-after" in response.headers
                response.headers["x-should-retry"] = "true" if retry else "false"
            return response

        return handle_as_openai


def install(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for a route's error statuses, all with the error shape."""
    return {status: {"model": ErrorOut} for status in statuses}
