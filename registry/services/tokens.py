"""Create, authenticate and revoke API tokens."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.errors import Conflict, NotFound, Unauthorized
from registry.models import ApiToken, utcnow
from registry.security import check_scopes, display_prefix, hash_token, new_token
from registry.services import audit

LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


def create_token(session: Session, name: str, scopes: list[str], *, actor: str = "cli") -> tuple[ApiToken, str]:
    """Create a token; returns the row and the clear token, which is shown once and never stored."""
    scopes = check_scopes(scopes)
    if not name or len(name) > 100:
        raise ValueError("a token needs a name of 1 to 100 characters")
    if session.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
        raise Conflict(f"a token named {name!r} exists already; pick another name or revoke it first")
    clear = new_token()
    row = ApiToken(name=name, prefix=display_prefix(clear), token_hash=hash_token(clear), scopes=scopes)
    session.add(row)
    session.flush()
    audit.record(session, actor, "token.create", "token", row.id, name=name, scopes=scopes)
    return row, clear


def authenticate(session: Session, clear: str) -> ApiToken:
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(clear)))
    if row is None or row.revoked_at is not None:
        raise Unauthorized("the API token is unknown or revoked; create one with `qfilters token create`")
    now = utcnow()
    last = row.last_used_at
    if last is None or now - (last if last.tzinfo else last.replace(tzinfo=now.tzinfo)) > LAST_USED_RESOLUTION:
        row.last_used_at = now  # at most one write a minute per token, not one per request
    return row


def revoke_token(session: Session, name: str, *, actor: str = "cli") -> ApiToken:
    row = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if row is None:
        raise NotFound(f"no token named {name!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit.record(session, actor, "token.revoke", "token", row.id, name=name)
    return row


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)).all())
