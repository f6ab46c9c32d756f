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

from tests.workers.conftest import TINY_JOB, Stack, free_port, wait_until


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


@pytest.mark.parametrize("stack", [{"metrics_port": free_port()}], indirect=True)
def test_a_job_runs_through_the_pool(stack: Stack) -> None:
    import httpx

    stack.start_api()
    stack.start_worker("w1")
    job = stack.submit(TINY_JOB)
    final = stack.wait_final([job["id"]], 240)[job["id"]]
    assert final["status"] == "succeeded", final["error"]
    _assert_each_job_once(stack, [job["id"]])
    steps = stack.sql("SELECT kind, position, status, attempts, duplicates FROM job_tasks ORDER BY kind, position")
    assert steps == [("calibrate", 0, "done", 1, 0), ("calibrate", 1, "done", 1, 0), ("publish", 0, "done", 1, 0),
                     ("validate", 0, "done", 1, 0)]
    # torch (and with it CUDA) lives only in the pool child that computes, never in the parent that forks it
    parent = stack.workers["w1"].pid
    (claimed_by,) = {r[0] for r in stack.sql("SELECT claimed_by FROM job_tasks")}
    child = int(claimed_by.rsplit(":", 1)[1])
    assert child != parent
    assert "libtorch" in Path(f"/proc/{child}/maps").read_text()
    assert "libtorch" not in Path(f"/proc/{parent}/maps").read_text()
    # Prometheus: jobs by state and queue depth from the API, step durations and tokens/s from the worker
    api_metrics = httpx.get(f"{stack.base}/metrics", timeout=30).text
    assert 'qfilters_jobs{state="succeeded"} 1.0' in api_metrics and 'qfilters_queue_depth{queue="cpu"}' in api_metrics
    worker_metrics = httpx.get(f"http://127.0.0.1:{stack.env['QFILTERS_METRICS_PORT']}/metrics", timeout=30).text
    assert 'qfilters_task_seconds_count{kind="calibrate",outcome="done"} 2.0' in worker_metrics
    assert "qfilters_calibration_tokens_per_second" in worker_metrics


def _worker_of(stack: Stack, claimed_by: str) -> str | None:
    """The name of the worker whose pool child claimed a step (its process group is the worker's)."""
    import os

    pid = int(claimed_by.rsplit(":", 1)[1])
    try:
        group = os.getpgid(pid)
    except ProcessLookupError:
        return None
    return next((name for name, proc in stack.workers.items() if proc.pid == group), None)


@pytest.mark.parametrize("stack", [{"max_attempts": 20}], indirect=True)
def test_kill_9_in_the_middle_of_calibration_ten_times(stack: Stack) -> None:
    stack.start_api()
    stack.start_worker("w0")
    stack.start_worker("w1")
    job_ids = [stack.submit(TINY_JOB)["id"] for _ in range(3)]
    kills, spawned = 0, 2

    def calibration_in_progress() -> list[tuple]:
        pending = stack.sql("SELECT count(*) FROM jobs WHERE status = 'queued' OR id IN (SELECT job_id FROM job_tasks "
                            "WHERE kind = 'calibrate' AND status IN ('queued', 'running'))")[0][0]
        if pending == 0:  # every calibration is done: more work to kill in
            job_ids.append(stack.submit(TINY_JOB)["id"])
        return stack.sql("SELECT claimed_by FROM job_tasks WHERE kind = 'calibrate' AND status = 'running' "
                         "AND tokens_done > 0 AND tokens_done < tokens_total")

    while kills < 10:
        found = wait_until(calibration_in_progress, 120, "a calibration in progress", interval=0.1)
        name = _worker_of(stack, found[0][0])
        if name is None:
            continue  # it just ended
        stack.kill_worker(name)
        kills += 1
        stack.start_worker(f"w{spawned}")
        spawned += 1
    final = stack.wait_final(job_ids, 300)
    assert {j: f["status"] for j, f in final.items()} == {j: "succeeded" for j in job_ids}
    _assert_each_job_once(stack, job_ids)
    recovered = stack.sql("SELECT count(*) FROM audit_events WHERE action = 'job.step.recover'")[0][0]
    assert recovered >= 1  # killed steps came back through the sweeper, with their attempts counted
    assert stack.sql("SELECT max(attempts) FROM job_tasks WHERE kind = 'calibrate'")[0][0] >= 2


def test_jobs_queued_when_the_broker_restarts_empty_all_complete(stack: Stack, redis_server) -> None:
    stack.start_api()
    job_ids = [stack.submit(TINY_JOB)["id"] for _ in range(3)]
    wait_until(lambda: redis_server.llen("cpu") == 3, 30, "three start messages in the broker")
    redis_server.restart_empty()
    assert redis_server.llen("cpu") == 0  # every message is gone
    stack.start_worker("w0")
    final = stack.wait_final(job_ids, 240)
    assert {j: f["status"] for j, f in final.items()} == {j: "succeeded" for j in job_ids}
    _assert_each_job_once(stack, job_ids)


def test_a_message_delivered_twice_computes_once(stack: Stack, redis_server) -> None:
    import redis

    from registry.config import Settings
    from registry.dispatch import broker_app

    stack.start_api()
    job_id = stack.submit(TINY_JOB)["id"]
    wait_until(lambda: redis_server.llen("cpu") == 1, 30, "the start message in the broker")
    client = redis.Redis(port=redis_server.port)
    client.lpush("cpu", client.lindex("cpu", 0))  # the very same message, twice
    assert redis_server.llen("cpu") == 2
    stack.start_worker("w0")
    stack.start_worker("w1")
    assert stack.wait_final([job_id], 240)[job_id]["status"] == "succeeded"
    # a late redelivery of a calibration that is long done
    app = broker_app(Settings(broker_url=redis_server.url, database_url="sqlite://"))
    app.send_task("qfilters.job.calibrate", args=(job_id, 0), queue="cpu")
    wait_until(lambda: stack.sql("SELECT duplicates FROM job_tasks WHERE kind = 'calibrate' AND position = 0")[0][0],
               60, "the late copy to be seen")
    assert stack.sql("SELECT attempts FROM jobs")[0][0] == 1
    assert stack.sql("SELECT count(*) FROM audit_events WHERE action = 'job.start'")[0][0] == 1
    assert {r[0] for r in stack.sql("SELECT attempts FROM job_tasks")} == {1}  # each step computed once
    _assert_each_job_once(stack, [job_id])


def test_a_poison_step_fails_after_bounded_attempts_and_bad_input_is_never_retried(stack: Stack) -> None:
    stack.start_api()
    stack.start_worker("w0")
    bad = stack.submit({**TINY_JOB, "model": "qfilters-test/no-such-model"})["id"]
    poison = stack.submit(TINY_JOB)["id"]
    spawned = 1
    for attempt in (1, 2, 3):  # the worker running calibration 0 of the poison job dies every time
        row = wait_until(lambda attempt=attempt: stack.sql(
            "SELECT claimed_by FROM job_tasks WHERE job_id = :j AND kind = 'calibrate' AND position = 0 "
            "AND status = 'running' AND attempts = :a", j=poison, a=attempt), 120, f"attempt {attempt}", 0.1)
        name = _worker_of(stack, row[0][0])
        assert name is not None
        stack.kill_worker(name)
        stack.start_worker(f"w{spawned}")
        spawned += 1
    final = stack.wait_final([poison, bad], 120)
    assert final[poison]["status"] == "failed"
    assert "attempt 3 of 3" in final[poison]["error"], final[poison]["error"]
    assert final[bad]["status"] == "failed" and "ModelError" in final[bad]["error"], final[bad]
    time.sleep(8)  # longer than the sweeper's requeue and stale delays: nothing comes back
    assert stack.sql("SELECT status, attempts FROM jobs WHERE id = :j", j=bad) == [("failed", 1)]
    assert stack.sql("SELECT max(attempts) FROM job_tasks WHERE job_id = :j", j=bad) == [(1,)]
    assert stack.sql("SELECT status FROM jobs WHERE id = :j", j=poison) == [("failed",)]


def test_cancel_stops_a_running_job_at_its_next_batch(stack: Stack) -> None:
    import httpx

    stack.start_api()
    stack.start_worker("w0")
    job_id = stack.submit(TINY_JOB)["id"]
    wait_until(lambda: _running_calibration(stack), 120, "a calibration in progress", interval=0.1)
    progress = stack.job(job_id)["progress"]
    assert 0 < progress["tokens_done"] < progress["tokens_total"] and progress["fraction"] > 0
    answer = httpx.post(f"{stack.base}/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {stack.token}"},
                        timeout=30)
    assert answer.status_code == 200 and answer.json()["cancel_requested"]
    assert stack.wait_final([job_id], 60)[job_id]["status"] == "cancelled"
    statuses = {r[0] for r in stack.sql("SELECT status FROM job_tasks")}
    assert "running" not in statuses and "done" not in {r[0] for r in stack.sql(
        "SELECT status FROM job_tasks WHERE kind <> 'calibrate'")}
    assert stack.sql("SELECT count(*) FROM filter_sets") == [(0,)]


# size limits raised past the request (the operator's own caps are tested with the API): the queues decide here
@pytest.mark.parametrize("stack", [{"queues": "cpu=16,gpu=80,gpu-x4=320", "max_seq_len": 131072,
                                    "max_batch_tokens": 2**24}], indirect=True)
def test_jobs_are_queued_by_the_memory_their_model_needs(stack: Stack, redis_server) -> None:
    import httpx

    from tests.workers.conftest import BIG_REPO

    stack.start_api()
    small = stack.submit(TINY_JOB)["id"]
    big = stack.submit({**TINY_JOB, "model": BIG_REPO})["id"]  # 70B: config read from the Hub cache, no weights
    assert dict(stack.sql("SELECT id, queue FROM jobs")) == {small: "cpu", big: "gpu-x4"}
    wait_until(lambda: redis_server.llen("gpu-x4") == 1 and redis_server.llen("cpu") == 1, 30, "both start messages")
    too_big = httpx.post(f"{stack.base}/v1/jobs", json={**TINY_JOB, "model": BIG_REPO, "batch_size": 256,
                                                        "seq_len": 65536, "tokens": 65536},
                         headers={"Authorization": f"Bearer {stack.token}"}, timeout=60)
    assert too_big.status_code == 422 and too_big.headers["content-type"] == "application/problem+json"
    assert "gpu-x4" in too_big.json()["detail"]
    assert stack.sql("SELECT count(*) FROM jobs") == [(2,)]  # nothing half-written
