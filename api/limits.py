"""Request bodies over this server's limits are refused with a 413 before anything reads them."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from jobs.settings import Settings

FORM_OVERHEAD = 64 * 1024  # a dataset upload's multipart framing and its small `name` field


class BodyLimit:
    """Pure ASGI middleware: a dataset upload (multipart) may carry up to GRPO_MAX_DATASET_BYTES,
    any other body up to GRPO_MAX_REQUEST_BYTES. A declared Content-Length over the limit is
    answered at once; a chunked body is counted as it arrives."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings

    def limit_for(self, scope: Scope) -> tuple[int, str]:
        headers = dict(scope["headers"])
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data"):
            return self.settings.max_dataset_bytes + FORM_OVERHEAD, "GRPO_MAX_DATASET_BYTES"
        return self.settings.max_request_bytes, "GRPO_MAX_REQUEST_BYTES"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):  # no route reads their bodies
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_for(scope)
        too_large = f"the request body is larger than this server's limit of {limit} bytes ({setting})"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await error_response(413, "payload_too_large", too_large)(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI passes an HTTPException raised while it reads the body through to
                    # the error handlers (any other exception becomes a 400).
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, receive_within_limit, send)
