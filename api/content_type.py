"""The guard of the routes that read a body: a 415 naming the media type they take, before the
body is parsed."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request

from jobs.errors import UnsupportedMediaType


def accepts(media_type: str) -> Any:
    """A route dependency: 415 unless the request's body is ``media_type``."""

    async def content_type_is(request: Request) -> None:
        sent = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if sent != media_type:
            raise UnsupportedMediaType(
                f"{request.method} {request.url.path} takes {media_type}, "
                f"not {sent or 'a body without a Content-Type'}",
                param="Content-Type",
            )

    return Depends(content_type_is)
