"""Acceptance: cancelling a default-size SmolLM2 job while it evaluates ends it ``cancelled`` within 10 s.

The runner is the real one of ``qfilters serve`` (a background thread, the real model cache, the embedded SmolLM2),
and the cancel goes through the API. The evaluation settings are the defaults (1024-token chunks, up to 6 documents,
budgets L/4..L/32: the base sweep alone is ~40 forward passes); only calibration is shortened (one batch per dataset),
so the test reaches the evaluation quickly and cancels as soon as it starts.
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow

JOB = {"model": "smollm2", "datasets": ["handbook:en", "handbook:fr"], "eval_datasets": ["python-code"],
       "tokens": 2048}  # everything else: the API's defaults
CANCEL_WITHIN_S = 10.0


def _wait_for(client, job_id: str, until, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job) or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def test_cancel_during_evaluation_of_a_default_size_smollm2_job(sqlite_registry) -> None:
    from registry.runner import JobRunner

    reg = sqlite_registry
    headers = reg.auth(reg.token("submit"))
    created = reg.client.post("/v1/jobs", json=JOB, headers=headers)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    runner = JobRunner(reg.state.session_factory, reg.state.store, poll_seconds=0.2)
    runner.start(recover=False)
    try:
        job = _wait_for(reg.client, job_id, lambda j: j["status"] in ("validating", "failed", "succeeded"), 600)
        assert job["status"] == "validating" and job["progress"]["phase"].startswith("evaluating"), job
        asked = time.monotonic()
        assert reg.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).json()["cancel_requested"] is True
        job = _wait_for(reg.client, job_id, lambda j: j["status"] not in ("running", "validating"), 60)
        took = time.monotonic() - asked
    finally:
        runner.stop(timeout=60)
    assert job["status"] == "cancelled", job
    assert took < CANCEL_WITHIN_S, f"cancel took {took:.1f} s"
    assert job["filter_set_id"] is None and job["finished_at"]
    print(f"cancelled {took:.2f} s after the request, during {job['progress']['phase']!r}")
