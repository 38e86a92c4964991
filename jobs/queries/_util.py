from __future__ import annotations

from typing import Any

from sqlalchemy import Select, Table
from sqlalchemy.orm import Session


def page(session: Session, stmt: Select[Any], *, limit: int) -> tuple[list[Any], bool]:
    """The first ``limit`` results of ``stmt`` and whether more follow."""
    rows = list(session.scalars(stmt.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def upsert(session: Session, table: Table) -> Any:
    """``INSERT`` with ``on_conflict_do_update``, for the two dialects we run on."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"upsert on {dialect}")
    return insert(table)
