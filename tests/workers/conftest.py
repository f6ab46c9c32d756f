"""Worker-pool fixtures: real processes, real services, nothing shared disturbed.

* our own ``redis-server`` on a free port (no persistence: a restart flushes it), never the machine's;
* the machine's PostgreSQL with a fresh database per test, or our own cluster (``initdb`` + ``pg_ctl`` on a free port
  in a temporary directory) for the tests that stop the database;
* a tiny random Llama served from a local Hub cache (``HF_HOME``, offline), so workers load it by its Hub id;
* a :class:`Stack`: ``qfilters serve`` with ``QFILTERS_EXECUTOR=celery`` and real ``qfilters worker`` processes, each in
  its own process group so a test can ``kill -9`` a worker with its pool child.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
QFILTERS = str(Path(sys.executable).parent / "qfilters")
PG_ADMIN_URL = os.environ.get("QFILTERS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
TINY_REPO = "qfilters-test/tiny-llama"
BIG_REPO = "qfilters-test/llama-70b"  # a Llama-3-70B config.json, no weights
LLAMA_70B_CONFIG = {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256,
                    "tie_word_embeddings": False}
FINAL = ("succeeded", "failed", "cancelled")

# A tiny-model job whose calibrations last long enough to be caught in the middle (a few seconds each).
TINY_JOB = {
    "model": TINY_REPO,
    "datasets": ["handbook:en", "handbook:fr"],
    "eval_datasets": ["python-code"],
    "tokens": 98304,
    "seq_len": 128,
    "batch_size": 2,
    "eval_seq_len": 128,
    "score_last": 64,
    "budgets": [48, 24],
    "max_docs": 2,
    "publish_to": "acme/tiny-llama-qfilters",
    "force_publish": True,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """Our own redis-server; ``restart_empty`` is a broker restart that lost every message."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.dir = free_port(), workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)], stdout=subprocess.DEVNULL)
        wait_until(self._ping, 10, "redis-server")

    def _ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.exceptions.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def restart_empty(self) -> None:
        self.stop()
        self.start()

    def llen(self, queue: str) -> int:
        import redis

        return int(redis.Redis(port=self.port).llen(queue))


class PostgresCluster:
    """Our own PostgreSQL cluster in a temporary directory on a free port, run as the postgres user."""

    def __init__(self) -> None:
        self.bin = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        self.root = Path(tempfile.mkdtemp(prefix="qfilters-pg-"))
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.port = free_port()
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres([f"{self.bin}/initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8"])
        self.start()
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE registry")

    def _as_postgres(self, cmd: list[str]) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(prefix + cmd, check=True, capture_output=True, timeout=120)

    def url(self, db: str = "registry") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self._as_postgres([f"{self.bin}/pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60",
                           "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])

    def stop(self) -> None:
        self._as_postgres([f"{self.bin}/pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def _redis_process() -> Iterator[RedisServer]:
    workdir = Path(tempfile.mkdtemp(prefix="qfilters-redis-"))
    server = RedisServer(workdir)
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_server(_redis_process: RedisServer) -> RedisServer:
    """Our redis-server, empty for each test (a previous test's late messages never reach the next one)."""
    import redis

    if _redis_process.proc is None:
        _redis_process.start()
    redis.Redis(port=_redis_process.port).flushall()
    return _redis_process


@pytest.fixture
def pool_database() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL, dropped afterwards."""
    import psycopg

    name = f"qfilters_pool_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def tiny_hub() -> Iterator[Path]:
    """HF_HOME with the tiny random Llama as Hub repo qfilters-test/tiny-llama (revision main), for offline loads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import char_tokenizer  # the offline character tokenizer of the tiny-llama fixture

    home = Path(tempfile.mkdtemp(prefix="qfilters-hf-"))
    repo = home / "hub" / f"models--{TINY_REPO.replace('/', '--')}"
    commit = "1" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    big = home / "hub" / f"models--{BIG_REPO.replace('/', '--')}"  # only a config: what routing reads
    (big / "snapshots" / commit).mkdir(parents=True)
    (big / "refs").mkdir()
    (big / "refs" / "main").write_text(commit)
    (big / "snapshots" / commit / "config.json").write_text(json.dumps(LLAMA_70B_CONFIG))
    yield home
    shutil.rmtree(home, ignore_errors=True)


class Stack:
    """The API and workers as real processes, sharing one database, one broker and one artifact directory."""

    def __init__(self, workdir: Path, database_url: str, broker_url: str, hf_home: Path, **settings: Any) -> None:
        self.workdir, self.database_url = workdir, database_url
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "QFILTERS_DATA_DIR": str(workdir / "data"),
               "QFILTERS_DATABASE_URL": database_url, "QFILTERS_EXECUTOR": "celery", "QFILTERS_BROKER_URL": broker_url,
               "QFILTERS_QUEUES": "cpu=16", "QFILTERS_SWEEP_SECONDS": "1", "QFILTERS_REQUEUE_AFTER_SECONDS": "5",
               "QFILTERS_STALE_AFTER_SECONDS": "6", "QFILTERS_HEARTBEAT_SECONDS": "1", "QFILTERS_DB_POOL_TIMEOUT": "5",
               "QFILTERS_PROGRESS_SECONDS": "0.05",  # a quiet machine calibrates the tiny job in about a second
               "HF_HOME": str(hf_home), "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               # No Hub here: the test models are allow-listed and load from the HF cache (huggingface.co does not
               # resolve, so the cache answers at once), and publications go to the API's own Hub-compatible
               # endpoint with a publish token from a secret file. Not HF_HUB_OFFLINE=1: it would block that push.
               "QFILTERS_ALLOWED_MODELS": "qfilters-test/*", "QFILTERS_HUB_ENDPOINT": "self",
               # two jobs may push to one repo at once: the loser's 412 (branch moved) is retried
               "QFILTERS_HUB_TOKEN_FILE": str(workdir / "secrets" / "hub-token"), "QFILTERS_HUB_RETRIES": "3"}
        self.api_port = free_port()
        env["QFILTERS_BASE_URL"] = f"http://127.0.0.1:{self.api_port}"
        env.update({f"QFILTERS_{k.upper()}": str(v) for k, v in settings.items()})
        self.env = env
        self.api: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.base = ""
        self.token = self._create_token("pool", "submit", "publish")  # the jobs publish: both scopes
        hub_token = Path(env["QFILTERS_HUB_TOKEN_FILE"])
        hub_token.parent.mkdir(parents=True, exist_ok=True)
        hub_token.write_text(self._create_token("hub-publisher", "publish") + "\n")
        from sqlalchemy import create_engine

        from registry.db import normalize_url

        self.engine = create_engine(normalize_url(database_url), pool_pre_ping=True)

    def _create_token(self, prefix: str, *scopes: str) -> str:
        args = [a for scope in scopes for a in ("--scope", scope)]
        created = subprocess.run([QFILTERS, "token", "create", f"{prefix}-{uuid.uuid4().hex[:6]}", *args],
                                 env=self.env, capture_output=True, text=True, timeout=120)
        assert created.returncode == 0, created.stderr
        return created.stdout.strip()

    # ---- processes
    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child process owns it
        return subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_api(self) -> None:
        port = self.api_port  # fixed for the stack's life: workers publish to its Hub endpoint (QFILTERS_BASE_URL)
        self.api = self._spawn("api", [QFILTERS, "serve", "--port", str(port), "--log-level", "warning"])
        self.base = f"http://127.0.0.1:{port}"
        wait_until(self._api_up, 120, "the API")

    def _api_up(self) -> bool:
        assert self.api is not None and self.api.poll() is None, self.log("api")
        try:
            return httpx.get(f"{self.base}/v1/models", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def start_worker(self, name: str) -> subprocess.Popen:
        proc = self._spawn(name, [QFILTERS, "worker", "--queue", "cpu", "--loglevel", "info"])
        self.workers[name] = proc
        return proc

    def kill_worker(self, name: str) -> None:
        """``kill -9`` of the worker and its pool child: what a crash, an OOM kill or a lost host looks like."""
        proc = self.workers.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def close(self) -> None:
        for name in list(self.workers):
            self.kill_worker(name)
        if self.api is not None:
            os.killpg(self.api.pid, signal.SIGTERM)
            try:
                self.api.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.api.pid, signal.SIGKILL)
        self.engine.dispose()

    # ---- API
    def submit(self, body: dict, key: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"}
        if key:
            headers["Idempotency-Key"] = key
        response = httpx.post(f"{self.base}/v1/jobs", json=body, headers=headers, timeout=60)
        assert response.status_code == 201, response.text
        return response.json()

    def job(self, job_id: str) -> dict:
        return httpx.get(f"{self.base}/v1/jobs/{job_id}", timeout=30).json()

    def wait_final(self, job_ids: list[str], timeout: float) -> dict[str, dict]:
        def all_final() -> dict[str, dict] | None:
            rows = dict(self.sql("SELECT id, status FROM jobs WHERE id = ANY(:ids)", ids=job_ids))
            if all(rows.get(j) in FINAL for j in job_ids):
                return {j: self.job(j) for j in job_ids}
            return None

        try:
            return wait_until(all_final, timeout, f"jobs {job_ids} to end", interval=0.5)
        except AssertionError:
            print({n: self.log(n) for n in ["api", *self.workers]})
            print(self.sql("SELECT job_id, kind, position, status, attempts, error FROM job_tasks"))
            raise

    def sql(self, query: str, **params: Any) -> list[tuple]:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(query), params).all()]
