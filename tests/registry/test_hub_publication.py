"""Publications are pushed for real: a job with ``publish_to`` and a publication requested over the API both land as
one tagged commit on a Hub endpoint (here the registry's own, over real HTTP); a publisher killed between the upload
and the bookkeeping converges on retry to the same commit and the same row; a refused token fails the job clearly."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi
from safetensors.torch import load_file
from sqlalchemy import select

from registry.models import FilterSet, Job, Publication
from registry.runner import JobRunner
from registry.services.publish import CRASH_AFTER_UPLOAD_ENV, HubTarget, publish_publication
from tests.registry.conftest import TINY_JOB, TinyModels
from tests.registry.hub_server import LiveRegistry

BASE = "acme/tiny-llama"
REPO = "acme/tiny-llama-qfilters"


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveRegistry]:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    token_file = tmp_path / "secrets" / "hub-token"
    reg = LiveRegistry(f"sqlite:///{tmp_path / 'registry.sqlite3'}", tmp_path / "data", hub_endpoint="self",
                       hub_token_file=token_file, hub_retries=0, allowed_models=[BASE])
    token_file.parent.mkdir()
    token_file.write_text(reg.token("publish", name="hub-publisher") + "\n")
    yield reg
    reg.stop()


def _run_job(live: LiveRegistry, lm, **fields) -> tuple[str, str | None, int | None, str | None]:
    """Submit over HTTP, run with the real runner (tiny model); (status, error, filter set id, weights sha256)."""
    publishing = "publish_to" in fields or "force_publish" in fields  # a job that publishes needs the publish scope
    submit = live.token("submit", *(["publish"] if publishing else []))
    answer = httpx.post(f"{live.url}/v1/jobs", json={**TINY_JOB, "model": BASE, **fields},
                        headers={"Authorization": f"Bearer {submit}"})
    assert answer.status_code == 201, answer.text
    runner = JobRunner(live.state.session_factory, live.state.store, hub=HubTarget.from_settings(live.settings))
    runner.models = TinyModels(lm)  # type: ignore[assignment]
    while runner.run_once() is not None:
        pass
    with live.state.session_factory() as session:
        job = session.get(Job, answer.json()["id"])
        fs = job.filter_set
        return job.status, job.error, fs.id if fs else None, fs.sha256 if fs else None


def _publications(live: LiveRegistry) -> list[Publication]:
    with live.state.session_factory() as session:
        return list(session.scalars(select(Publication).order_by(Publication.id)).all())


def test_job_publishes_and_a_fresh_process_loads_the_same_tensor(
        live: LiveRegistry, tiny_llama, tmp_path: Path) -> None:
    status, error, _, weights_sha = _run_job(live, tiny_llama, publish_to=REPO, force_publish=True)
    assert status == "succeeded", error
    (pub,) = _publications(live)
    assert pub.status == "published" and pub.tag == "v1" and pub.attempts == 1
    api = HfApi(endpoint=live.url)
    assert api.list_repo_refs(REPO).tags[0].target_commit == pub.commit_sha
    with live.state.session_factory() as session:
        verdict = session.scalar(select(FilterSet.verdict))
    # discoverable the way clients look for filters of a base model (the H11 client contract)
    (found,) = api.list_models(filter=["q-filters", f"base_model:{BASE}"])
    assert found.id == REPO and f"qfilters-verdict:{verdict}" in found.tags and "kv-cache-compression" in found.tags

    # a fresh process asks for the filters of the BASE model: found through the endpoint's tag search, same tensor
    script = ("import hashlib, sys; from qfilters import QFilters; "
              "f = QFilters.from_pretrained(sys.argv[1], endpoint=sys.argv[2]); "
              "print(hashlib.sha256(f.filters.contiguous().numpy().tobytes()).hexdigest(), f.source)")
    out = subprocess.run([sys.executable, "-c", script, BASE, live.url], capture_output=True, text=True, timeout=300,
                         check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    weights = api.hf_hub_download(REPO, "model.safetensors", revision=pub.commit_sha, cache_dir=tmp_path / "hub-cache")
    published = load_file(weights)["q_filters"]
    assert hashlib.sha256(published.contiguous().numpy().tobytes()).hexdigest() == out.stdout.split()[0]
    assert "hub-search" in out.stdout and REPO in out.stdout  # found by the base model's id, not named
    assert hashlib.sha256(Path(weights).read_bytes()).hexdigest() == weights_sha

    # asked over the API without a repo id: the organisation's default naming; the runner pushes it
    publisher = {"Authorization": f"Bearer {live.token('publish')}"}
    asked = httpx.post(f"{live.url}/v1/filter-sets/{pub.filter_set_id}/publications", json={"force": True},
                       headers=publisher).json()
    assert asked["repo_id"] == "qfilters/tiny-llama-qfilters" and asked["status"] == "pending"
    runner = JobRunner(live.state.session_factory, live.state.store, hub=HubTarget.from_settings(live.settings))
    assert runner.run_once() == "published" and runner.run_once() is None
    (_, second) = _publications(live)
    assert second.commit_sha == api.list_repo_refs("qfilters/tiny-llama-qfilters").tags[0].target_commit


def test_publisher_killed_between_upload_and_bookkeeping_converges(live: LiveRegistry, tiny_llama,
                                                                   tmp_path: Path) -> None:
    status, error, filter_set_id, weights_sha = _run_job(live, tiny_llama)
    assert status == "succeeded", error
    publisher = live.token("publish")
    answer = httpx.post(f"{live.url}/v1/filter-sets/{filter_set_id}/publications",
                        json={"repo_id": REPO, "force": True}, headers={"Authorization": f"Bearer {publisher}"})
    assert answer.status_code == 201 and answer.json()["status"] == "pending", answer.text
    pub_id = answer.json()["id"]

    # a real publisher process, killed (SIGKILL) right after its upload, before it records anything
    script = ("import sys; from registry.config import Settings; from registry.db import make_engine, "
              "make_session_factory; from registry.store import ArtifactStore; "
              "from registry.services.publish import HubTarget, publish_publication; s = Settings(); "
              "print(publish_publication(make_session_factory(make_engine(s.database_url)), "
              "ArtifactStore(s.artifact_dir), HubTarget.from_settings(s), int(sys.argv[1])))")
    settings = live.settings
    env = {**os.environ, CRASH_AFTER_UPLOAD_ENV: str(pub_id), "QFILTERS_DATABASE_URL": settings.database_url,
           "QFILTERS_DATA_DIR": str(settings.data_dir), "QFILTERS_HUB_ENDPOINT": "self",
           "QFILTERS_BASE_URL": live.url, "QFILTERS_HUB_TOKEN_FILE": str(settings.hub_token_file),
           "QFILTERS_HUB_RETRIES": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    crashed = subprocess.run([sys.executable, "-c", script, str(pub_id)], env=env, capture_output=True, text=True,
                             timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    api = HfApi(endpoint=live.url)
    uploaded = api.list_repo_refs(REPO).tags[0].target_commit
    commits = len(api.list_repo_commits(REPO))
    (pub,) = _publications(live)
    assert pub.status == "publishing" and pub.commit_sha is None  # the upload happened, the bookkeeping did not

    # a live claim is not taken over; once stale, the retry converges on the same commit and the same row
    target = HubTarget.from_settings(live.settings)
    assert publish_publication(live.state.session_factory, live.state.store, target, pub_id) == "publishing"
    assert publish_publication(live.state.session_factory, live.state.store, target, pub_id,
                               stale_after=dt.timedelta(0)) == "published"
    (pub,) = _publications(live)
    assert (pub.status, pub.commit_sha, pub.attempts) == ("published", uploaded, 2)
    assert "already on the Hub" in pub.detail
    assert len(api.list_repo_commits(REPO)) == commits
    # and publishing again is a no-op that says so
    assert publish_publication(live.state.session_factory, live.state.store, target, pub_id) == "published"
    files = {s.rfilename for s in api.model_info(REPO).siblings}
    assert {"config.json", "model.safetensors", "qfilters.json", "README.md", "report/report.html"} <= files
    weights = api.hf_hub_download(REPO, "model.safetensors", revision="v1", cache_dir=tmp_path / "c")
    assert hashlib.sha256(Path(weights).read_bytes()).hexdigest() == weights_sha


def test_refused_token_fails_the_job_clearly(live: LiveRegistry, tiny_llama) -> None:
    live.settings.hub_token_file.write_text(live.token("read") + "\n")  # may read, may not publish
    status, error, _, _ = _run_job(live, tiny_llama, publish_to=REPO, force_publish=True)
    assert status == "failed" and error is not None
    assert "publishing to acme/tiny-llama-qfilters failed: HubAuthError" in error
    assert "refused the token" in error and "HTTP 403" in error
    (pub,) = _publications(live)
    assert pub.status == "failed" and pub.attempts == 1 and pub.commit_sha is None
    assert live.settings.hub_token_file.read_text().strip() not in error


def test_self_endpoint_needs_the_registry_url(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from registry.config import Settings

    with pytest.raises(ValidationError, match="set QFILTERS_BASE_URL"):
        Settings(data_dir=tmp_path, hub_endpoint="self", base_url="")
    assert HubTarget.from_settings(Settings(data_dir=tmp_path, hub_endpoint="self",
                                            base_url="http://registry:8000/")).endpoint == "http://registry:8000"
