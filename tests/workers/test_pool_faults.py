"""The worker pool under faults, on real processes and services (the tiny random Llama keeps each loop short):

* kill -9 of a worker in the middle of calibration, 10 times in one test: every job ends once, succeeded, with one
  filter set and one publication each;
* the broker restarted empty with jobs queued: all of them complete once it is back;
* the same message delivered twice: the step computes once (counted in SQL);
* a poison step (its worker dies every time) fails the job after the bounded attempts, with the reason; a bad-input
  job fails at its first attempt and is never retried.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from tests.workers.conftest import TINY_JOB, Stack, wait_until


@pytest.fixture
def stack(tmp_path: Path, pool_database: str, redis_server, tiny_hub, request):
    settings = getattr(request, "param", {})
    s = Stack(tmp_path, pool_database, redis_server.url, tiny_hub, **settings)
    yield s
    s.close()


def _running_calibration(stack: Stack) -> tuple[str, int] | None:
    rows = stack.sql("SELECT job_id, position FROM job_tasks WHERE kind = 'calibrate' AND status = 'running' "
                     "AND tokens_done > 0 AND tokens_done < tokens_total")
    return rows[0] if rows else None


def _assert_each_job_once(stack: Stack, job_ids: list[str]) -> None:
    finished = Counter(j for (j,) in stack.sql(
        "SELECT target_id FROM audit_events WHERE action IN ('job.succeeded', 'job.failed', 'job.cancelled')"))
    assert all(finished[j] == 1 for j in job_ids), finished
    per_job = dict(stack.sql("SELECT job_id, count(*) FROM filter_sets GROUP BY job_id"))
    assert per_job == {j: 1 for j in job_ids}
    publications = stack.sql("SELECT f.job_id FROM publications p JOIN filter_sets f ON f.id = p.filter_set_id")
    assert sorted(j for (j,) in publications) == sorted(job_ids)


def test_a_job_runs_through_the_pool(stack: Stack) -> None:
    stack.start_api()
    stack.start_worker("w1")
    job = stack.submit(TINY_JOB)
    final = stack.wait_final([job["id"]], 240)[job["id"]]
    assert final["status"] == "succeeded", final
    _assert_each_job_once(stack, [job["id"]])
    steps = stack.sql("SELECT kind, position, status, attempts, duplicates FROM job_tasks ORDER BY kind, position")
    assert steps == [("calibrate", 0, "done", 1, 0), ("calibrate", 1, "done", 1, 0), ("publish", 0, "done", 1, 0),
                     ("validate", 0, "done", 1, 0)]
