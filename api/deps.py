"""Dependencies the routes share, and their ``Annotated`` aliases.

Routes open their unit of work in their own body, ``with db.transaction() as session:``,
rather than receive a request-scoped session: FastAPI runs a route and the exit of a yield
dependency in two different thread hops, and a session that holds its pooled connection from
one hop to the next deadlocks under load (every thread waiting for a connection that a request
waiting for a thread holds). One unit of work in one thread cannot.
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

from fastapi import Depends, Header, Query, Request

from api.cache import ResponseCache
from jobs.broker import Dispatcher
from jobs.db import Database
from jobs.settings import Settings

# ``async def`` although they do no I/O: FastAPI runs a plain ``def`` dependency in the
# threadpool, a thread hop per request that would buy nothing here.


async def app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def database(request: Request) -> Database:
    return request.app.state.database


async def dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


class Poll(NamedTuple):
    db: Database
    cache: ResponseCache
    owner: str


def poll(request: Request) -> Poll:
    """What the two routes every client polls need, read from the request by the route itself:
    FastAPI solves each dependency of each request anew, ~10 µs apiece, and three of them were
    a fifth of what a cached answer costs the server."""
    state = request.app.state
    return Poll(state.database, state.response_cache, request.state.owner)


async def current_owner(request: Request) -> str:
    """Whose request this is: the owner of its API key (or the one local owner when
    ``GRPO_AUTH=disabled``), as ``AuthenticateFirst`` found it before the route (and its body)
    was reached; it answered 401 or 429 itself."""
    return request.state.owner


async def current_key_id(request: Request) -> str:
    """The id of the request's API key (the one local owner when ``GRPO_AUTH=disabled``): what
    per-key limits count by."""
    return request.state.key_id


# The database's integers: a larger value in a query would fail there, so it is a 422 here.
MAX_STEP = 2**31 - 1
MAX_EVENT_ID = 2**63 - 1

CurrentOwner = Annotated[str, Depends(current_owner)]
CurrentKeyId = Annotated[str, Depends(current_key_id)]
SettingsDep = Annotated[Settings, Depends(app_settings)]
DatabaseDep = Annotated[Database, Depends(database)]
DispatcherDep = Annotated[Dispatcher, Depends(dispatcher)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=255,
        description=(
            "Retrying with the same key and body within 24 hours (GRPO_IDEMPOTENCY_TTL_S) returns what the "
            "first request made; the same key with another body is a 409. Keys are per owner."
        ),
    ),
]
After = Annotated[str | None, Query(description="The last id of the previous page.", max_length=64)]
Limit = Annotated[int, Query(ge=1, le=100, description="Page size.")]
