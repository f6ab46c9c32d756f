"""The audit trail: one row per write (who, what, when)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.models import AuditEvent
from registry.services.query import page, where_equal


def record(session: Session, actor: str, action: str, target_type: str, target_id: object,
           **detail: Any) -> AuditEvent:
    event = AuditEvent(actor=actor, action=action, target_type=target_type, target_id=str(target_id), detail=detail)
    session.add(event)
    return event


def list_events(session: Session, *, action: str | None = None, target_type: str | None = None,
                target_id: str | None = None, limit: int = 100, offset: int = 0) -> tuple[list[AuditEvent], int]:
    query = where_equal(select(AuditEvent), (AuditEvent.action, action), (AuditEvent.target_type, target_type),
                        (AuditEvent.target_id, target_id))
    return page(session, query, AuditEvent.id.desc(), limit=limit, offset=offset)
