"""``qfilters token`` and ``qfilters db``: tokens shown once and stored hashed, bad scopes refused, revocation."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from qfilters.cli import app


@pytest.fixture
def cli(database_url, tmp_path, monkeypatch):
    from registry.config import get_settings

    monkeypatch.setenv("QFILTERS_DATABASE_URL", database_url)
    monkeypatch.setenv("QFILTERS_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield lambda *args: CliRunner().invoke(app, list(args))
    get_settings.cache_clear()


def test_token_lifecycle(cli, database_url, tmp_path) -> None:
    from tests.registry.conftest import Registry

    created = cli("token", "create", "alice", "--scope", "submit", "--scope", "publish")
    assert created.exit_code == 0, created.output
    clear = created.stdout.strip().splitlines()[-1]
    assert clear.startswith("qft_") and len(clear) > 40
    listing = cli("token", "list")
    assert "alice" in listing.output and clear not in listing.output and clear[:10] in listing.output

    duplicate = cli("token", "create", "alice")
    assert duplicate.exit_code == 2 and "exists already" in duplicate.output
    bad = cli("token", "create", "bob", "--scope", "superuser")
    assert bad.exit_code == 2 and "unknown scope" in bad.output and "read, submit, publish, admin" in bad.output

    reg = Registry(database_url, tmp_path / "data")
    try:
        assert reg.client.get("/v1/jobs", headers=reg.auth(clear)).status_code == 200
        assert cli("token", "revoke", "alice").exit_code == 0
        assert reg.client.post("/v1/jobs", json={}, headers=reg.auth(clear)).status_code == 401
    finally:
        reg.close()
    assert cli("token", "revoke", "nobody").exit_code == 2


def test_db_commands(cli) -> None:
    assert cli("db", "upgrade").exit_code == 0
    from alembic.script import ScriptDirectory

    from registry.migrate import MIGRATIONS_DIR, alembic_config

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert MIGRATIONS_DIR.is_dir() and head is not None
    assert cli("db", "current").stdout.strip() == head  # the newest migration, whichever it is
    assert cli("db", "downgrade").exit_code == 0
    assert "empty" in cli("db", "current").stdout
