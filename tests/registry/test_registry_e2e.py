"""End to end on the embedded default, over real HTTP: ``qfilters serve`` (SQLite, local artifact store, in-process
runner) in a subprocess, a token from ``qfilters token create``, a SmolLM2 job on two calibration datasets submitted
like the README's curl command, followed live in headless Chromium until it succeeds with a filter set, a verdict and
a report page; then the pages are browsed from the model list to the report. Screenshots: test-artifacts/registry_*.png.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

QFILTERS = str(Path(sys.executable).parent / "qfilters")
JOB = {
    "model": "smollm2",
    "datasets": ["handbook:en", "python-code"],
    "eval_datasets": ["austen"],
    "tokens": 2048,
    "seq_len": 512,
    "eval_seq_len": 512,
    "score_last": 256,
    "budgets": [128, 64, 32],
    "max_docs": 2,
}
JOB_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(artifacts_dir):
    data = Path(tempfile.mkdtemp(prefix="qfilters-serve-"))
    env = {**os.environ, "QFILTERS_DATA_DIR": str(data), "QFILTERS_RUNNER_POLL_SECONDS": "0.5"}
    created = subprocess.run([QFILTERS, "token", "create", "e2e", "--scope", "submit"], env=env, capture_output=True,
                             text=True, check=True)
    token = created.stdout.strip()
    assert token.startswith("qft_") and token not in created.stderr
    port = _free_port()
    log = open(artifacts_dir / "registry_serve.log", "w")  # noqa: SIM115 - the server writes to it until killed
    proc = subprocess.Popen([QFILTERS, "serve", "--port", str(port), "--log-level", "warning"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, (artifacts_dir / "registry_serve.log").read_text()
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "qfilters serve did not come up in 120 s"
        time.sleep(0.5)
    yield {"base": base, "token": token, "data": data}
    proc.terminate()
    proc.wait(20)
    log.close()
    assert token not in (artifacts_dir / "registry_serve.log").read_text()  # secrets never reach the logs


@pytest.fixture(scope="module")
def submitted_job(server):
    response = httpx.post(f"{server['base']}/v1/jobs", json=JOB, timeout=30,
                          headers={"Authorization": f"Bearer {server['token']}", "Idempotency-Key": "e2e-1"})
    assert response.status_code == 201, response.text
    return response.json()


def _wait(server, job_id: str, seen: list[dict]) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = httpx.get(f"{server['base']}/v1/jobs/{job_id}", timeout=10).json()
        seen.append(job)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job still {job['status']} after {JOB_TIMEOUT_S} s"
        time.sleep(1)


def test_job_page_follows_the_job_live_until_it_succeeds(server, submitted_job, browser, artifacts_dir) -> None:
    page = browser.new_page()
    page.goto(f"{server['base']}/jobs/{submitted_job['id']}")
    widths: list[float] = []
    statuses: list[str] = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        status = page.locator("#status").inner_text()
        statuses.append(status)
        if status in ("succeeded", "failed", "cancelled"):
            break
        widths.append(float(page.locator("#bar").evaluate("e => parseFloat(e.style.width)")))
        if len(widths) == 10:
            page.screenshot(path=str(artifacts_dir / "registry_job_running.png"), full_page=True)
        assert time.monotonic() < deadline, f"job page still shows {status}"
        page.wait_for_timeout(1000)
    page.wait_for_load_state("load")  # the page reloads itself once the job ends
    page.screenshot(path=str(artifacts_dir / "registry_job_done.png"), full_page=True)
    assert page.locator("#status").inner_text() == "succeeded", page.content()
    assert "open the report" in page.locator("#result").inner_text()
    # the page moved on its own (no reloads by us): the bar filled up and the phases changed
    assert widths and max(widths) > widths[0] and widths == sorted(widths), widths
    assert {"running", "validating"} & set(statuses)


def test_the_job_ends_with_a_filter_set_a_verdict_and_a_report(server, submitted_job) -> None:
    seen: list[dict] = []
    job = _wait(server, submitted_job["id"], seen)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1 and job["progress"]["tokens_done"] == job["progress"]["tokens_total"] == 4096
    base = server["base"]
    fs = httpx.get(f"{base}/v1/filter-sets/{job['filter_set_id']}").json()
    assert fs["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and fs["shape"] == [30, 3, 64]
    assert fs["verdict"] in ("pass", "fail") and fs["datasets"] == JOB["datasets"]
    report = httpx.get(fs["links"]["report_json"]).json()
    assert report["verdict"]["status"] == fs["verdict"] and report["settings"]["calibration"] == JOB["datasets"]
    assert report["artifact_sha256"] == fs["sha256"]
    page = httpx.get(f"{base}/filter-sets/{fs['id']}/report")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    model = httpx.get(f"{base}/v1/models/{fs['model_id']}").json()
    assert model["model_type"] == "llama" and model["num_kv_heads"] == 3 and model["qk_norm"] is False
    if fs["verdict"] == "pass":
        resolved = httpx.get(f"{base}/v1/resolve", params={"model": fs["model"]}).json()
        assert resolved["filter_set"]["id"] == fs["id"] and resolved["alias"] == "latest"
    # resubmitting with the same key is the same job, even after it ran
    again = httpx.post(f"{base}/v1/jobs", json=JOB, timeout=30,
                       headers={"Authorization": f"Bearer {server['token']}", "Idempotency-Key": "e2e-1"})
    assert again.status_code == 200 and again.json()["id"] == job["id"]


def test_pages_lead_from_the_model_list_to_the_report(server, submitted_job, browser, artifacts_dir) -> None:
    job = _wait(server, submitted_job["id"], [])
    assert job["status"] == "succeeded"
    page = browser.new_page()
    page.goto(server["base"] + "/")
    models = page.locator("#models")
    assert models.is_visible() and "HuggingFaceTB/SmolLM2-135M-Instruct" in models.inner_text()
    assert "llama" in models.inner_text()
    page.screenshot(path=str(artifacts_dir / "registry_models.png"), full_page=True)

    page.get_by_role("link", name="HuggingFaceTB/SmolLM2-135M-Instruct").click()
    page.wait_for_load_state("load")
    versions = page.locator("#versions")
    assert versions.is_visible()
    row = versions.locator("tr").nth(1).inner_text()
    assert "v1" in row and ("pass" in row or "fail" in row) and "handbook:en, python-code" in row
    page.screenshot(path=str(artifacts_dir / "registry_model.png"), full_page=True)

    versions.get_by_role("link", name="report").first.click()
    page.wait_for_load_state("load")
    assert page.url.endswith("/filter-sets/1/report")
    fs = httpx.get(f"{server['base']}/v1/filter-sets/1").json()
    assert page.locator("#verdict").is_visible()
    assert page.inner_text("#verdict-status").strip() == fs["verdict"].upper()
    for figure in ("cosine-matrix", "head-heatmap", "transfer-matrix"):
        image = page.locator(f"#{figure} img").first
        assert image.is_visible(), figure
        assert image.evaluate("img => img.complete && img.naturalWidth > 0"), f"{figure} did not decode"
    page.screenshot(path=str(artifacts_dir / "registry_report.png"), full_page=True)
