"""Engines and sessions. Query functions take a session; whoever opened it commits."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # The API and the worker are two processes writing one file: WAL lets readers run beside
    # the writer, and the busy timeout makes a second writer wait instead of failing at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


POOL_SIZE = 20
MAX_OVERFLOW = 10  # beyond the pool: connections opened for a burst and closed after it


def make_engine(database_url: str, *, pooled: bool = True, pool_size: int = POOL_SIZE) -> Engine:
    """An engine for ``database_url``; ``pooled=False`` for one-off work such as migrations."""
    pooling: dict[str, Any] = {} if pooled else {"poolclass": NullPool}
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(database_url, connect_args={"check_same_thread": False}, **pooling)
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    if pooled:
        pooling = {"pool_pre_ping": True, "pool_size": pool_size, "max_overflow": MAX_OVERFLOW}
    # A database that went away fails a new connection in seconds, not after the OS gives up on
    # the TCP handshake: the worker's retries and the API's 5xx depend on hearing about it.
    return create_engine(database_url, connect_args={"connect_timeout": 10}, **pooling)


_engines: dict[str, Engine] = {}


def get_engine(database_url: str, *, pool_size: int = POOL_SIZE) -> Engine:
    """One engine per URL and process (``pool_size`` counts when it is made)."""
    engine = _engines.get(database_url)
    if engine is None:
        engine = _engines[database_url] = make_engine(database_url, pool_size=pool_size)
    return engine


def _forget_inherited_engines() -> None:
    # A forked child (a Celery pool process) must not touch its parent's pooled connections,
    # not even to close them: that would end the parent's sessions on the server.
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()
    _sessionmaker_for.cache_clear()


os.register_at_fork(after_in_child=_forget_inherited_engines)


@lru_cache
def _sessionmaker_for(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def session_factory(database_url: str, *, pool_size: int = POOL_SIZE) -> sessionmaker[Session]:
    return _sessionmaker_for(get_engine(database_url, pool_size=pool_size))


def call_after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run ``callback`` once the session's transaction has committed (e.g. send a task)."""
    session.info.setdefault("after_commit", []).append(callback)


def call_after_rollback(session: Session, callback: Callable[[], None]) -> None:
    """Run ``callback`` if the transaction is rolled back (e.g. remove a file written for it)."""
    session.info.setdefault("after_rollback", []).append(callback)


def _run_callbacks(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:
            log.exception("callback %r failed after the transaction ended", callback)


def end_unit_of_work(session: Session, *, failed: bool) -> None:
    """Commit (or, if ``failed`` or the commit fails, roll back) and close ``session``; then run
    its after-commit or after-rollback callbacks."""
    committed = False
    try:
        if not failed:
            session.commit()
            committed = True
    finally:
        if not committed:
            session.rollback()
        session.close()
        callbacks = session.info.pop("after_commit" if committed else "after_rollback", [])
        session.info.clear()
        _run_callbacks(callbacks)


@contextmanager
def unit_of_work(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed when the block ends and rolled back if it raises.

    The one owner of a transaction (the worker's, and the API's through ``Database.transaction``);
    query functions only flush.
    """
    session = sessions()
    try:
        yield session
    except BaseException:
        end_unit_of_work(session, failed=True)
        raise
    end_unit_of_work(session, failed=False)


def transaction(database_url: str) -> AbstractContextManager[Session]:
    return unit_of_work(session_factory(database_url))


def _refuse_writes(session: Session, _context: Any, _instances: Any) -> None:
    raise RuntimeError("a Database.read() session cannot write; use Database.transaction()")


class Database:
    """The service's database as the API holds it: ``with db.transaction() as session:``, or for
    a route that only reads, with one statement, ``with db.read() as session:``."""

    def __init__(self, database_url: str, *, pool_size: int = POOL_SIZE):
        self.pool_size = pool_size
        self.sessions = session_factory(database_url, pool_size=pool_size)
        # The same pool, its connections in autocommit: a lone SELECT is consistent by itself and
        # needs no BEGIN and COMMIT around it, one round trip instead of three on a polled route.
        engine = get_engine(database_url, pool_size=pool_size)
        self.read_sessions = sessionmaker(
            engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
        )
        event.listen(self.read_sessions, "before_flush", _refuse_writes)

    def transaction(self) -> AbstractContextManager[Session]:
        return unit_of_work(self.sessions)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading with a single statement (several statements would each see
        their own snapshot); anything it writes is refused."""
        session = self.read_sessions()
        try:
            yield session
        finally:
            session.close()
