"""``QFilters.from_pretrained(base_model_id)`` through a registry (``QFILTERS_REGISTRY_URL``): the real registry app
on a real uvicorn server, a filter set made by the real job pipeline on the tiny random Llama, then the client's
resolve -> download -> strict load, offline from its content-addressed cache, and its refusals."""

from __future__ import annotations

import copy
import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub

from qfilters.artifact import QFilters
from qfilters.errors import ArtifactError, FiltersNotFoundError
from tests.registry.conftest import PASSING_GATES, TINY_JOB, run_queued_jobs


class LiveServer:
    """The registry app under uvicorn on loopback, in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def served(sqlite_registry, tiny_llama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A registry with one passing filter set for ``tiny-llama``, served over HTTP, and an empty Hub next to it."""
    client = sqlite_registry.client
    body = copy.deepcopy(TINY_JOB)
    body["gates"] = PASSING_GATES
    headers = sqlite_registry.auth(sqlite_registry.token("submit", "publish"))  # loose gates need the publish scope
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 201, response.text
    assert run_queued_jobs(sqlite_registry, tiny_llama) == ["succeeded"]
    monkeypatch.setenv("QFILTERS_CACHE", str(tmp_path / "qfilters-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with LiveServer(sqlite_registry.app) as base, FakeHub() as hub:
        monkeypatch.setenv("QFILTERS_REGISTRY_URL", base)
        resolved = client.get("/v1/resolve", params={"model": "tiny-llama"}).json()
        yield {"base": base, "hub": hub, "resolved": resolved, "registry": sqlite_registry}


def test_a_base_model_id_resolves_through_the_registry_then_offline(served, tiny_llama, tmp_path: Path) -> None:
    hub, resolved = served["hub"], served["resolved"]
    got = QFilters.from_pretrained("tiny-llama", endpoint=hub.url, cache_dir=tmp_path / "hf",
                                   expected_shape=tiny_llama.info.filter_shape)
    assert got.source["kind"] == "registry" and got.source["registry"] == served["base"]
    assert got.source["filter_set"] == resolved["filter_set"]["id"] and got.source["alias"] == "latest"
    weights = next(f for f in resolved["files"] if f["name"] == "model.safetensors")
    assert got.artifact_info["tensor_sha256"] == weights["sha256"]  # the very file the registry lists

    # the registry's files are cached by sha256: offline (or with the registry down), the same filters load
    served["registry"].close()
    offline = QFilters.from_pretrained("tiny-llama", endpoint=hub.url, cache_dir=tmp_path / "hf",
                                       local_files_only=True)
    assert torch.equal(offline.filters, got.filters) and offline.source["kind"] == "registry"
    blobs = tmp_path / "qfilters-cache" / "client" / "blobs"
    assert {p.name for p in blobs.iterdir()} == {f["sha256"] for f in resolved["files"]}  # the three artifact files


def test_registry_misses_are_listed_and_a_changed_cached_file_is_refused(served, tmp_path: Path) -> None:
    hub = served["hub"]
    with pytest.raises(FiltersNotFoundError) as info:
        QFilters.from_pretrained("acme/never-calibrated", endpoint=hub.url, cache_dir=tmp_path / "hf")
    message = str(info.value)
    assert f"registry {served['base']}: no filters" in message and "Hub search" in message
    assert "nthngdy/never-calibrated_qfilt" in message

    QFilters.from_pretrained("tiny-llama", endpoint=hub.url, cache_dir=tmp_path / "hf")
    config_sha = next(f["sha256"] for f in served["resolved"]["files"] if f["name"] == "config.json")
    blob = tmp_path / "qfilters-cache" / "client" / "blobs" / config_sha
    data = json.loads(blob.read_text())
    blob.write_text(json.dumps(data, indent=4))  # same meaning, other bytes: still refused
    with pytest.raises(ArtifactError, match="changed in the cache"):
        QFilters.from_pretrained("tiny-llama", endpoint=hub.url, cache_dir=tmp_path / "hf", local_files_only=True)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() != config_sha
