"""PostgreSQL stopped for 30 s while the pool runs jobs (our own cluster on its own port, never the machine's):
the API answers 503 problem+json meanwhile, then API and workers recover on their own, and every job ends once."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.workers.conftest import TINY_JOB, PostgresCluster, Stack, wait_until
from tests.workers.test_pool_faults import _assert_each_job_once

OUTAGE_S = 30


@pytest.fixture
def cluster():
    pg = PostgresCluster()
    yield pg
    pg.destroy()


def test_database_down_for_30_seconds_during_a_run(tmp_path: Path, cluster, redis_server, tiny_hub) -> None:
    stack = Stack(tmp_path, cluster.url(), redis_server.url, tiny_hub)
    try:
        stack.start_api()
        stack.start_worker("w0")
        stack.start_worker("w1")
        job_ids = [stack.submit(TINY_JOB)["id"] for _ in range(3)]
        wait_until(lambda: stack.sql("SELECT 1 FROM job_tasks WHERE kind = 'calibrate' AND status = 'running' "
                                     "AND tokens_done > 0"), 120, "a calibration in progress", interval=0.1)
        stack.engine.dispose()
        cluster.stop()
        down_at, answers = time.monotonic(), []
        while time.monotonic() - down_at < OUTAGE_S:
            response = httpx.get(f"{stack.base}/v1/jobs/{job_ids[0]}", timeout=30)
            answers.append((response.status_code, response.headers.get("content-type", "")))
            time.sleep(1)
        post = httpx.post(f"{stack.base}/v1/jobs", json=TINY_JOB, headers={"Authorization": f"Bearer {stack.token}"},
                          timeout=30)
        cluster.start()
        assert answers and all(a == (503, "application/problem+json") for a in answers), answers
        assert post.status_code == 503 and post.json()["status"] == 503
        final = stack.wait_final(job_ids, 300)
        assert {j: f["status"] for j, f in final.items()} == {j: "succeeded" for j in job_ids}
        _assert_each_job_once(stack, job_ids)
        assert stack.sql("SELECT count(*) FROM jobs")[0][0] == len(job_ids)  # the refused submission made nothing
    finally:
        stack.close()
