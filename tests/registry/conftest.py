"""Registry fixtures: real PostgreSQL (started if down) and SQLite databases, an app per test, tokens, and a filter set
produced by the real job pipeline on the tiny random Llama (fast) for tests that need catalogue rows."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("QFILTERS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_ready() -> bool:
    import psycopg

    try:
        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
        return True
    except psycopg.OperationalError:
        return False


def ensure_postgres() -> None:
    """Start the machine's PostgreSQL cluster if it is down (the tests talk to the real server, never a mock)."""
    if _pg_ready():
        return
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if versions:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"], check=False)
    for _ in range(30):
        if _pg_ready():
            return
        time.sleep(1)
    pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL} and could not be started")


@pytest.fixture(scope="session")
def postgres_server() -> str:
    ensure_postgres()
    return PG_ADMIN_URL


def _create_pg_database(admin_url: str) -> tuple[str, str]:
    import psycopg

    name = f"qfilters_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name, name


def _drop_pg_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> Iterator[str]:
    """An empty database on each backend: a SQLite file, or a fresh PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.sqlite3'}"
        return
    admin = request.getfixturevalue("postgres_server")
    url, name = _create_pg_database(admin)
    try:
        yield url
    finally:
        _drop_pg_database(admin, name)


def make_settings(database_url: str, data_dir: Path, **overrides):
    from registry.config import Settings

    # tiny-llama is served by TinyModels, not the Hub: allow-list it (and the tests' own made-up ids), as an operator
    # would the models of an offline server's Hugging Face cache
    overrides.setdefault("allowed_models", ["tiny-llama", "qfilters-test/*"])
    return Settings(database_url=database_url, data_dir=data_dir, run_jobs=False, **overrides)


class Registry:
    """An app on a migrated database, a test client, and helpers to make tokens."""

    def __init__(self, database_url: str, data_dir: Path, **overrides) -> None:
        from fastapi.testclient import TestClient

        from registry.main import create_app
        from registry.migrate import upgrade

        upgrade(database_url)
        self.settings = make_settings(database_url, data_dir, **overrides)
        self.app = create_app(self.settings, run_jobs=False)
        self.state = self.app.state.registry
        self.client = TestClient(self.app)
        self.client.__enter__()

    def token(self, *scopes: str, name: str | None = None) -> str:
        from registry.db import session_scope
        from registry.services import tokens

        with session_scope(self.state.session_factory) as session:
            _row, clear = tokens.create_token(session, name or f"t-{uuid.uuid4().hex[:8]}", list(scopes))
        return clear

    @staticmethod
    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def close(self) -> None:
        self.client.__exit__(None, None, None)


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(database_url, tmp_path / "data")
    yield reg
    reg.close()


@pytest.fixture
def sqlite_registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(f"sqlite:///{tmp_path / 'registry.sqlite3'}", tmp_path / "data")
    yield reg
    reg.close()


# Small, valid job: the tiny model runs it in seconds; python-code needs no download.
TINY_JOB = {
    "model": "tiny-llama",
    "datasets": ["handbook:en", "handbook:fr"],
    "eval_datasets": ["python-code"],
    "tokens": 256,
    "seq_len": 128,
    "eval_seq_len": 128,
    "score_last": 64,
    "budgets": [48, 24],
    "max_docs": 2,
}


# Thresholds every run passes (the tiny random model fails the defaults). Looser than the defaults: the publish scope.
PASSING_GATES = {"cross_dataset_cosine": -1, "gap_ratio_vs_streamingllm": 1e9, "gap_vs_knorm": 1e9,
                 "split_half_min": -1}


def job_body(**changes) -> dict:
    """TINY_JOB with ``changes`` applied (a fresh copy each time)."""
    import copy

    body = copy.deepcopy(TINY_JOB)
    body.update(changes)
    return body


def assert_problem(response, status: int) -> dict:
    """The response is an RFC 9457 problem with ``status``; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


class TinyModels:
    """A ModelCache stand-in that serves the tiny random Llama for any model name (unit tests only)."""

    def __init__(self, lm) -> None:
        self.lm = lm
        self.requests: list[tuple[str, str, str]] = []

    def get(self, name: str, revision: str, device: str):
        self.requests.append((name, revision, device))
        return self.lm


def run_queued_jobs(reg: Registry, lm) -> list[str]:
    """Drive the real runner protocol (claim -> execute_job -> finish) until the queue is empty."""
    from registry.runner import JobRunner

    runner = JobRunner(reg.state.session_factory, reg.state.store)
    runner.models = TinyModels(lm)  # type: ignore[assignment]
    statuses = []
    while (status := runner.run_once()) is not None:
        statuses.append(status)
    return statuses
