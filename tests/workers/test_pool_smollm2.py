"""Acceptance on the real SmolLM2, over REST, with two real workers: a job on three calibration datasets reaches
``succeeded`` with a validated filter set and its report, and calibrations of different datasets ran at the same
time on different workers (from the start and end timestamps stored per step)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.workers.conftest import Stack

pytestmark = pytest.mark.slow

JOB = {
    "model": "smollm2",
    "datasets": ["handbook:en", "python-code", "handbook:de"],
    "eval_datasets": ["austen"],
    "tokens": 2048,
    "seq_len": 256,
    "eval_seq_len": 256,
    "score_last": 128,
    "budgets": [64, 32],
    "max_docs": 2,
}


def test_smollm2_job_on_three_datasets_with_two_workers(tmp_path: Path, pool_database, redis_server,
                                                         tiny_hub) -> None:
    stack = Stack(tmp_path, pool_database, redis_server.url, tiny_hub, stale_after_seconds=120)
    try:
        stack.start_api()
        stack.start_worker("w0")
        stack.start_worker("w1")
        job = stack.submit(JOB, key="smollm2-3")
        final = stack.wait_final([job["id"]], 900)[job["id"]]
        assert final["status"] == "succeeded", final["error"]
        filter_set = httpx.get(final["links"]["filter_set"], timeout=30).json()
        assert filter_set["verdict"] in ("pass", "fail") and filter_set["datasets"] == JOB["datasets"]
        report = httpx.get(final["links"]["report"], timeout=30)
        assert report.status_code == 200 and "SmolLM2" in report.text
        runs = stack.sql("SELECT spec, claimed_by, started_at, finished_at, seconds FROM job_tasks "
                         "WHERE kind = 'calibrate' ORDER BY started_at")
        assert [r[0] for r in sorted(runs)] == sorted(JOB["datasets"])
        overlapping = [(a[0], b[0]) for i, a in enumerate(runs) for b in runs[i + 1:]
                       if a[1] != b[1] and a[2] < b[3] and b[2] < a[3]]
        print("calibration steps (spec, worker, start, end, compute s):", *runs, sep="\n  ")
        assert overlapping, f"no two calibrations ran at the same time on different workers: {runs}"
    finally:
        stack.close()
