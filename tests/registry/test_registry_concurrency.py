"""50 concurrent identical submissions with one Idempotency-Key make exactly one job, over real HTTP, on both
PostgreSQL and SQLite."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import uvicorn

from tests.registry.conftest import TINY_JOB, Registry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The registry app under a real uvicorn server in a thread (no runner: jobs stay queued)."""

    def __init__(self, reg: Registry) -> None:
        self.port = _free_port()
        config = uvicorn.Config(reg.app, host="127.0.0.1", port=self.port, log_level="warning",
                                limit_concurrency=200, backlog=256)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_fifty_concurrent_identical_submissions_make_one_job(registry) -> None:
    token = registry.token("submit")
    headers = {**registry.auth(token), "Idempotency-Key": "deploy-2026-11-25"}
    barrier = threading.Barrier(50)
    with LiveServer(registry) as base:
        def submit(_: int) -> httpx.Response:
            with httpx.Client(base_url=base, timeout=60) as client:
                barrier.wait()  # all 50 requests leave together
                return client.post("/v1/jobs", json=TINY_JOB, headers=headers)

        with ThreadPoolExecutor(max_workers=50) as pool:
            responses = list(pool.map(submit, range(50)))
        listing = httpx.get(f"{base}/v1/jobs").json()

    assert all(r.status_code in (200, 201) for r in responses), {r.status_code: r.text for r in responses}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sorted(r.status_code for r in responses) == [200] * 49 + [201]
    assert listing["total"] == 1
    # one set of dataset rows and one model row, not 50
    with registry.state.session_factory() as session:
        from sqlalchemy import func, select

        from registry.models import BaseModel_, Dataset, JobDataset

        assert session.scalar(select(func.count()).select_from(BaseModel_)) == 1
        # handbook:en, handbook:fr (calibration), python-code (evaluation)
        assert session.scalar(select(func.count()).select_from(Dataset)) == 3
        assert session.scalar(select(func.count()).select_from(JobDataset)) == 3
