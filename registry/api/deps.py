"""Request dependencies: the database session, the caller's identity and the scope checks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from registry.config import Settings
from registry.db import session_scope
from registry.errors import Forbidden, Unauthorized
from registry.security import effective_scopes
from registry.services import tokens
from registry.services.jobs import Viewer as JobViewer_
from registry.state import RegistryState

bearer = HTTPBearer(auto_error=False, description="API token created with `qfilters token create`")


def get_state(request: Request) -> RegistryState:
    return request.app.state.registry


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(get_state(request).session_factory) as session:
        yield session


StateDep = Annotated[RegistryState, Depends(get_state)]
SessionDep = Annotated[Session, Depends(get_session)]


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's name and scopes, or anonymous (public reads)."""

    name: str
    scopes: frozenset[str]
    token_id: int | None = None

    @property
    def anonymous(self) -> bool:
        return self.token_id is None


ANONYMOUS = Principal("anonymous", frozenset())


def get_principal(session: SessionDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
    if credentials is None:
        return ANONYMOUS
    row = tokens.authenticate(session, credentials.credentials)
    return Principal(row.name, frozenset(effective_scopes(row.scopes)), row.id)


def require(scope: str, *, public_if_enabled: bool = False) -> Callable[..., Principal]:
    """A dependency that lets the call through only with ``scope`` (or anonymously, for public reads)."""

    def check(request: Request, principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        settings: Settings = get_state(request).settings
        if public_if_enabled and settings.public_reads:
            return principal
        if principal.anonymous:
            raise Unauthorized(f"this call needs an API token with the {scope!r} scope: send "
                               "'Authorization: Bearer <token>' (create one with `qfilters token create`)")
        if scope not in principal.scopes:
            raise Forbidden(f"token {principal.name!r} lacks the {scope!r} scope (it has: "
                            f"{', '.join(sorted(principal.scopes)) or 'none'})")
        return principal

    return check


PublicRead = Annotated[Principal, Depends(require("read", public_if_enabled=True))]
Reader = Annotated[Principal, Depends(require("read"))]
Submitter = Annotated[Principal, Depends(require("submit"))]
Publisher = Annotated[Principal, Depends(require("publish"))]
Admin = Annotated[Principal, Depends(require("admin"))]


def job_viewer(request: Request, principal: PublicRead) -> JobViewer_:
    """Whose jobs the caller may see and change (see :class:`registry.services.jobs.Viewer`)."""
    return JobViewer_(principal.token_id, "admin" in principal.scopes, get_state(request).settings.public_reads)


JobViewer = Annotated[JobViewer_, Depends(job_viewer)]
