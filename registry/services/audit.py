"""The audit trail: one row per write (who, what, when)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry.models import AuditEvent


def record(session: Session, actor: str, action: str, target_type: str, target_id: object,
           **detail: Any) -> AuditEvent:
    event = AuditEvent(actor=actor, action=action, target_type=target_type, target_id=str(target_id), detail=detail)
    session.add(event)
    return event


def list_events(session: Session, *, action: str | None = None, target_type: str | None = None,
                target_id: str | None = None, limit: int = 100, offset: int = 0) -> tuple[list[AuditEvent], int]:
    query = select(AuditEvent)
    if action:
        query = query.where(AuditEvent.action == action)
    if target_type:
        query = query.where(AuditEvent.target_type == target_type)
    if target_id:
        query = query.where(AuditEvent.target_id == target_id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit).offset(offset)).all()
    return list(rows), total
