"""Engine and session factory: PostgreSQL (psycopg 3) in production and CI, SQLite as the embedded default."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, MetaData, UpdateBase, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

# Stable constraint names, so that Alembic migrations can name what they drop on both backends.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (SQLAlchemy would otherwise look for psycopg2)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def private_file(path: Path) -> None:
    """Create ``path``'s directory (0700) and the file itself (0600) if missing: the database holds token hashes and
    every job's request, and SQLite's -wal / -shm files copy the database file's permissions."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))


def make_engine(url: str, *, pool_size: int = 10, max_overflow: int = 5, pool_timeout: float = 30.0) -> Engine:
    """An engine for ``url``; the pool bounds PostgreSQL connections per process (SQLite needs none)."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            private_file(Path(path))
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the runner's progress writes
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=max_overflow,
                         pool_timeout=pool_timeout)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def execute_dml(session: Session, statement: UpdateBase) -> CursorResult[Any]:
    """``session.execute`` for an INSERT, UPDATE or DELETE, typed as what it returns: a :class:`CursorResult`, whose
    ``rowcount`` says how many rows it touched. (SQLAlchemy 2.1 annotates ``Session.execute`` as returning a plain
    ``Result`` for every statement, although its documentation promises a ``CursorResult`` for these.)"""
    return cast("CursorResult[Any]", session.execute(statement))
