from __future__ import annotations

from typing import Any

import httpx


class GrpoError(Exception):
    """A request the service refused or could not answer: its HTTP status and the error body's
    ``code``, ``message`` and ``param`` (the offending field, e.g. ``reward[0].pattern``).
    ``status`` is None when no answer came (the server could not be reached)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        details: list[dict[str, Any]] | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.code, self.param, self.details = message, status, code, param, details

    def __str__(self) -> str:  # "reward[0].pattern: is required for a regex reward"
        return (
            f"{self.param}: {self.message}" if self.param and self.param not in self.message else self.message
        )

    @classmethod
    def from_response(cls, response: httpx.Response) -> GrpoError:
        try:
            error = response.json()["error"]
            return cls(
                str(error["message"]),
                status=response.status_code,
                code=error.get("code"),
                param=error.get("param"),
                details=error.get("details"),
            )
        except (ValueError, KeyError, TypeError):  # not the service's error shape (a proxy's page)
            text = response.text.strip()[:200] or response.reason_phrase
            return cls(
                f"HTTP {response.status_code} from {response.request.url}: {text}",
                status=response.status_code,
                code="http_error",
            )
