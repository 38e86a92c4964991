"""The OpenAPI document, with what FastAPI cannot infer: the error shape of its own 422s (400s on
the OpenAI-compatible routes) and of the 400 for a body it cannot decode, and the API key every
``/v1`` operation needs (``AuthenticateFirst`` checks it, before any dependency)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import iter_route_contexts

from api.auth import PROTECTED_PREFIX
from api.errors import OpenAIRoute

BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key: `grpo keys create NAME` prints one.",
}


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
            )
            document_error_shape(schema, openai_operations(app))
            document_api_key(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def openai_operations(app: FastAPI) -> set[tuple[str, str]]:
    """``(path, method)`` of each OpenAI-compatible operation: an invalid request there is a 400."""
    return {
        (route.path, method.lower())
        for route in iter_route_contexts(app.routes)
        if isinstance(route.original_route, OpenAIRoute)
        for method in route.methods or ()
    }


def document_error_shape(schema: dict[str, Any], openai: set[tuple[str, str]]) -> None:
    """FastAPI documents its default body for the 422s it raises; ours have the error shape, and
    the OpenAI-compatible routes answer them as 400s. A body FastAPI cannot decode at all (JSON
    that is not UTF-8, a broken multipart form) is a 400 on every operation that takes one."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            if "422" in responses and (path, method) in openai:
                del responses["422"]
                responses.setdefault(
                    "400", {"description": "Invalid request: the message names the param.", "content": error}
                )
            elif "422" in responses:
                responses["422"]["content"] = error
            if "requestBody" in operation:
                responses.setdefault(
                    "400", {"description": "The body could not be decoded.", "content": error}
                )
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def document_api_key(schema: dict[str, Any]) -> None:
    schema.setdefault("components", {})["securitySchemes"] = {"HTTPBearer": BEARER}
    for path, operations in schema.get("paths", {}).items():
        if path.startswith(PROTECTED_PREFIX):
            for operation in operations.values():
                operation["security"] = [{"HTTPBearer": []}]
