"""Path and query parameters the database cannot hold are refused before a route runs.

PostgreSQL's ``text`` refuses the NUL character: an id, ``after`` or a ``metadata[KEY]`` filter
with ``%00`` in it would fail in the query, a 500. Request bodies are checked field by field
(``jobs.text``); the URL is checked here, once for every route, and answered as the route answers
an invalid request (422, or 400 on the OpenAI-compatible routes), naming the parameter.
"""

from __future__ import annotations

from fastapi.routing import iter_route_contexts
from starlette.datastructures import QueryParams
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from api.auth import PROTECTED_PREFIX
from api.errors import OpenAIRoute, error_response
from jobs.text import unstorable_reason


class RefuseUnstorableParams:
    """Pure ASGI middleware for the ``/v1`` routes (the ones that reach the database). The URL
    decoder already replaces bytes that are not UTF-8, so NUL is the one character to look for:
    a request without one costs two substring tests."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].startswith(PROTECTED_PREFIX)
            and (
                "\x00" in scope["path"] or b"%00" in scope["query_string"] or b"\x00" in scope["query_string"]
            )
        ):
            refusal = _refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _refusal(scope: Scope) -> Response | None:
    """The answer to a request whose path or query parameter cannot be stored; None when every
    parameter can be, or no route serves the request (the router answers 404 or 405)."""
    for route in iter_route_contexts(scope["app"].routes):  # in the router's order
        match, child = route.matches(scope)
        if match is Match.FULL:
            break
    else:
        return None
    named = [*child.get("path_params", {}).items(), *QueryParams(scope["query_string"]).multi_items()]
    for name, value in named:
        reason = unstorable_reason(name) or unstorable_reason(str(value))
        if reason is not None:
            param = name.replace("\x00", "\\u0000")
            where = "its name" if unstorable_reason(name) else "its value"
            status = 400 if isinstance(route.original_route, OpenAIRoute) else 422
            return error_response(status, "invalid_request", f"{param}: {where} {reason}", param)
    return None
