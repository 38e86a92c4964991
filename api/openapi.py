"""The OpenAPI document, with what FastAPI cannot infer: the error shape of its own 422s, and the
API key every ``/v1`` operation needs (``AuthenticateFirst`` checks it, before any dependency)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.auth import PROTECTED_PREFIX

BEARER = {"type": "http", "scheme": "bearer", "description": "An API key: `grpo keys create NAME` prints one."}


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes, tags=app.openapi_tags)
            document_error_shape(schema)
            document_api_key(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document_error_shape(schema: dict[str, Any]) -> None:
    """FastAPI documents its default body for the 422s it raises; ours have the error shape."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            response = operation.get("responses", {}).get("422")
            if response is not None:
                response["content"] = error
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def document_api_key(schema: dict[str, Any]) -> None:
    schema.setdefault("components", {})["securitySchemes"] = {"HTTPBearer": BEARER}
    for path, operations in schema.get("paths", {}).items():
        if path.startswith(PROTECTED_PREFIX):
            for operation in operations.values():
                operation["security"] = [{"HTTPBearer": []}]
