"""Race-free get-or-create: ``INSERT ... ON CONFLICT DO NOTHING`` then read back, on PostgreSQL and SQLite alike.

Concurrent identical submissions all end on the same row without savepoints or retry loops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

T = TypeVar("T")


def insert_ignore(session: Session, model: type[T], values: dict[str, Any], conflict: list[str]) -> None:
    dialect = session.get_bind().dialect.name
    # each dialect's own Insert (the generic one has no ON CONFLICT)
    inserts: dict[str, Callable[[type[T]], postgresql.Insert | sqlite.Insert]] = {
        "postgresql": postgresql.insert, "sqlite": sqlite.insert}
    insert = inserts.get(dialect)
    if insert is None:
        raise RuntimeError(f"unsupported database dialect {dialect!r}: use PostgreSQL or SQLite")
    session.execute(insert(model).values(**values).on_conflict_do_nothing(index_elements=conflict))


def get_or_create(session: Session, model: type[T], keys: dict[str, Any], defaults: dict[str, Any] | None = None) -> T:
    query = select(model).filter_by(**keys)
    row = session.scalar(query)
    if row is None:
        insert_ignore(session, model, {**keys, **(defaults or {})}, list(keys))
        row = session.scalar(query)
    assert row is not None
    return row
