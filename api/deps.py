"""Dependencies the routes share, and their ``Annotated`` aliases.

Routes open their unit of work in their own body, ``with db.transaction() as session:``,
rather than receive a request-scoped session: FastAPI runs a route and the exit of a yield
dependency in two different thread hops, and a session that holds its pooled connection from
one hop to the next deadlocks under load (every thread waiting for a connection that a request
waiting for a thread holds). One unit of work in one thread cannot.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from jobs.db import Database
from jobs.dispatch import Dispatcher
from jobs.settings import Settings

# ``async def`` although they do no I/O: FastAPI runs a plain ``def`` dependency in the
# threadpool, a thread hop per request that would buy nothing here.


async def app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def database(request: Request) -> Database:
    return request.app.state.database


async def dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


SettingsDep = Annotated[Settings, Depends(app_settings)]
DatabaseDep = Annotated[Database, Depends(database)]
DispatcherDep = Annotated[Dispatcher, Depends(dispatcher)]
After = Annotated[str | None, Query(description="The last id of the previous page.", max_length=64)]
Limit = Annotated[int, Query(ge=1, le=100, description="Page size.")]
