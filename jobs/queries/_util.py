"""Helpers of the query modules: paging, upserts, and values made storable as JSON."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import Select, Table
from sqlalchemy.orm import Session

from jobs.text import storable_text


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


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON the database can store: JSON has no NaN or infinity (a diverged
    value becomes null), a string loses the characters no column can hold (a model's or a
    grader's output may have a NUL), and anything unknown becomes its string."""
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {storable_text(str(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy and torch scalars
        return jsonable(value.item())
    return storable_text(str(value))


def metric_values(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The numbers of ``metrics`` as stored (a non-finite one as null); what is not a number is dropped."""
    return {
        k: v if v is None else float(v)
        for k, v in jsonable(metrics).items()
        if v is None or isinstance(v, int | float)
    }
