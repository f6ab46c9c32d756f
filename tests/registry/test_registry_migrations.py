"""Alembic migrations on real PostgreSQL and SQLite: upgrade/downgrade round-trips, and no drift from the ORM."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from registry.db import Base, make_engine
from registry.migrate import current, downgrade, upgrade


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_round_trip(database_url) -> None:
    upgrade(database_url)
    assert _tables(database_url) == set(Base.metadata.tables)
    assert current(database_url) is not None
    downgrade(database_url, "base")
    assert _tables(database_url) == set()
    assert current(database_url) is None
    upgrade(database_url)  # and back up again, on the same database
    assert _tables(database_url) == set(Base.metadata.tables)


def test_orm_models_and_migrations_do_not_drift(database_url) -> None:
    """Fails as soon as a column, index, constraint or type in registry/models.py has no migration."""
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], f"the ORM and the migrations differ; add a migration (alembic revision --autogenerate): {diff}"
