"""Alembic migrations of the registry database (PostgreSQL and SQLite)."""
