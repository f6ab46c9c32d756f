"""Listing helpers shared by every collection endpoint: optional equality filters and counted pages."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

T = TypeVar("T")


def where_equal(query: Select[Any], *conditions: tuple[Any, Any]) -> Select[Any]:
    """Add ``column == value`` for every condition whose value was given (None or "" mean: no filter)."""
    for column, value in conditions:
        if value is not None and value != "":
            query = query.where(column == value)
    return query


def page(session: Session, query: Select[Any], *order_by: Any, limit: int, offset: int,
         options: tuple[Any, ...] = ()) -> tuple[list[Any], int]:
    """One page of ``query`` in a stable order, and the total number of matching rows."""
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.options(*options).order_by(*order_by).limit(limit).offset(offset)).all()
    return list(rows), total
