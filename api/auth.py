"""Who a ``/v1`` request is from, decided before anything reads its body.

FastAPI reads and parses a route's body (a JSON document, or a multipart upload spooled to disk)
before it runs the route's dependencies, so an authentication dependency alone would let anyone
without a key make the server take in up to GRPO_MAX_DATASET_BYTES first. ``AuthenticateFirst``
checks the key and spends the rate-limit token from the headers alone; a request it refuses is
answered 401 or 429 with its body unread. The ``current_owner`` dependency then reads the owner
it found (and still documents the bearer scheme in OpenAPI).
"""

from __future__ import annotations

import inspect

from fastapi.concurrency import run_in_threadpool
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response, headers_of, status_of
from api.keycache import CheckedKey, KeyCache
from jobs.db import Database
from jobs.errors import RateLimited, ServiceError, Unauthenticated
from jobs.keys import HOW_TO_GET_ONE, LOCAL_OWNER, authenticate
from jobs.settings import Settings

LOCAL_KEY = CheckedKey(id=LOCAL_OWNER, owner=LOCAL_OWNER)  # every request's, with GRPO_AUTH=disabled
PROTECTED_PREFIX = (
    "/v1/"  # every /v1 route needs a live key; health, metrics, docs and the dashboard page do not
)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, as FastAPI's HTTPBearer reads it."""
    scheme, token = get_authorization_scheme_param(authorization)
    return token if scheme.lower() == "bearer" and token else None


def _live_key(db: Database, token: str) -> CheckedKey:
    with db.transaction() as session:
        key = authenticate(session=session, token=token)
        return CheckedKey(id=key.id, owner=key.owner)


async def authorize(state: State, token: str | None) -> CheckedKey:
    """``token``'s API key: its id and owner (both the one local owner when ``GRPO_AUTH=disabled``),
    with one token of its rate limit spent. ``Unauthenticated`` without a live key,
    ``RateLimited`` once the key is over its rate. ``state`` is the app's."""
    settings: Settings = state.settings
    if settings.auth == "disabled":
        key = LOCAL_KEY
    elif token is None:
        raise Unauthenticated(f"no API key; {HOW_TO_GET_ONE}")
    else:
        keys: KeyCache = state.key_cache
        key = keys.get(token)
        if key is None:
            key = await run_in_threadpool(_live_key, state.database, token)
            keys.put(token, key)
    limiter = state.rate_limiter
    wait_s = limiter.take(key.id)  # the in-process bucket: no I/O
    if inspect.isawaitable(wait_s):  # Redis' shared bucket
        wait_s = await wait_s
    if wait_s:
        raise RateLimited(wait_s, rate_per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst)
    return key


async def still_live(state: State, token: str | None) -> bool:
    """Whether ``token``'s key still lets its owner in, its rate limit untouched: what a response
    that outlives its request (an event stream) checks as it goes, so that a revoked key stops
    receiving within ``GRPO_API_KEY_CACHE_S``, as its new requests are refused."""
    if state.settings.auth == "disabled":
        return True
    if token is None:
        return False
    keys: KeyCache = state.key_cache
    if keys.get(token) is not None:
        return True
    try:
        keys.put(token, await run_in_threadpool(_live_key, state.database, token))
    except Unauthenticated:
        return False
    return True


class AuthenticateFirst:
    """Pure ASGI middleware: authorizes every ``/v1`` request from its headers, before the app
    (and FastAPI's body parsing) sees it; the owner goes to ``request.state.owner``, the key's id
    (what its limits are counted by) to ``request.state.key_id``."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        authorization = next(
            (value.decode("latin-1") for name, value in scope["headers"] if name == b"authorization"), None
        )
        try:
            key = await authorize(scope["app"].state, bearer_token(authorization))
        except ServiceError as exc:
            response = error_response(
                status_of(exc), exc.code, exc.message, exc.param, exc.details, headers_of(exc)
            )
            await response(scope, receive, send)  # the body is never received
            return
        state = scope.setdefault("state", {})
        state["owner"], state["key_id"] = key.owner, key.id
        await self.app(scope, receive, send)
