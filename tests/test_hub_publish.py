"""Publishing with qfilters.hub: the model card's metadata, and pushes over real HTTP to the registry's Hub-compatible
endpoint (uvicorn on loopback) through the very code path that pushes to huggingface.co: snapshot downloads at the tag
and at the commit return the exact files, offline from the cache too; publishing twice makes one commit; Hub failures
become clear errors, retried only when retrying can help."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from report_fixtures import make_report

from qfilters import QFilters
from qfilters.errors import HubAuthError, HubConflictError, HubUnavailableError
from qfilters.hub import collect_files, default_repo_id, publish
from qfilters.modelcard import build_model_card
from qfilters.validation.output import write_report

REPO = "acme/SmolLM2-135M-Instruct-qfilters"
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def filters_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    provenance = {"base_model": {"model_id": BASE, "model_type": "llama", "revision": "main"},
                  "calibration": {"datasets": [{"spec": "hf:wikitext:wikitext-2-raw-v1:train", "sha256": "ab" * 32,
                                                "tokens": 4096}], "tokens": 4096, "seq_len": 512, "seed": 0}}
    return QFilters(torch.randn(30, 3, 64), provenance).save_pretrained(tmp_path / "filters")


@pytest.fixture
def report_dir(tmp_path: Path) -> Path:
    report = make_report(True, calibration=["handbook:en", "hf:wikitext:wikitext-2-raw-v1:train"])
    write_report(report, tmp_path / "report")
    return tmp_path / "report"


def test_model_card_metadata_round_trips_through_huggingface_hub(filters_dir: Path, report_dir: Path) -> None:
    from qfilters.validation.output import read_report

    report = read_report(report_dir)
    card = build_model_card(filters_dir, repo_id=REPO, report=report,
                            figures=[("report/perplexity-0-austen.png", "Perplexity vs KV budget on austen")])
    parsed = ModelCard(str(card))
    data = parsed.data.to_dict()
    assert data["base_model"] == report.model_id
    assert data["base_model_relation"] == "adapter" and data["library_name"] == "qfilters"
    assert data["tags"][:2] == ["q-filters", "kv-cache-compression"]
    assert report.architecture.model_type in data["tags"] and "qfilters-verdict:pass" in data["tags"]
    assert data["datasets"] == ["wikitext"]  # only Hub datasets; handbook:en is a Debian corpus
    # the metadata survives a round trip through huggingface_hub's own card classes unchanged
    again = ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n{parsed.text}")
    assert again.data.to_dict() == data and again.text == parsed.text
    body = parsed.text
    assert "## Q-Filters validation" in body and "Verdict" in body
    assert "![Perplexity vs KV budget on austen](report/perplexity-0-austen.png)" in body
    assert body.index("### Perplexity at a KV budget") < body.index("![Perplexity") < body.index("### Use these")
    assert f"QFilters.from_pretrained({REPO!r})" in body and "QFilterPress" in body
    assert "## Provenance" in body and "ab" * 32 in body

    failing = build_model_card(filters_dir, repo_id=REPO, report=make_report(False), base_model=BASE)
    meta = ModelCard(str(failing)).data.to_dict()
    assert "qfilters-verdict:fail" in meta["tags"] and meta["license"] == "apache-2.0"  # inherited from SmolLM2
    assert meta["base_model"] == BASE
    assert default_repo_id(BASE, "acme") == REPO


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    from tests.registry.hub_server import LiveRegistry

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    reg = LiveRegistry(f"sqlite:///{tmp_path / 'registry.sqlite3'}", tmp_path / "data")
    yield reg
    reg.stop()


def _digests(directory: str | Path) -> dict[str, str]:
    root = Path(directory)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".cache" not in p.parts}


def test_publish_download_offline_and_idempotent(live, filters_dir: Path, report_dir: Path, tmp_path: Path) -> None:
    token = live.token("publish")
    result = publish(filters_dir, REPO, report_dir=report_dir, tag="v1", token=token, endpoint=live.url, retries=0)
    assert result.created_commit and len(result.commit_sha) == 40 and result.repo_url == f"{live.url}/{REPO}"
    expected = {path: hashlib.sha256(data).hexdigest() for path, data in
                collect_files(filters_dir, REPO, report_dir=report_dir).items()}
    assert {"config.json", "model.safetensors", "qfilters.json", "README.md", "report/report.json",
            "report/report.html", "report/report.md"} <= set(expected)
    assert any(p.startswith("report/perplexity-") and p.endswith(".png") for p in expected)

    cache = tmp_path / "hf-cache"
    for revision in ("v1", result.commit_sha):
        folder = snapshot_download(REPO, revision=revision, endpoint=live.url, cache_dir=cache)
        assert _digests(folder) == expected, revision

    # after one online fetch, the same calls work offline from the cache (a fresh process: the flag is read at import)
    script = ("import sys, json; from huggingface_hub import snapshot_download; "
              "print(json.dumps([snapshot_download(sys.argv[1], revision=r, endpoint=sys.argv[2], "
              "cache_dir=sys.argv[3]) for r in sys.argv[4:]]))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script, REPO, "http://127.0.0.1:9", str(cache), "v1",
                          result.commit_sha], env=env, capture_output=True, text=True, timeout=120, check=True)
    import json

    for folder in json.loads(out.stdout):
        assert _digests(folder) == expected

    # publishing the same filters again makes no new commit, at the tag or on main
    api = HfApi(endpoint=live.url, token=token)
    commits = len(api.list_repo_commits(REPO))
    again = publish(filters_dir, REPO, report_dir=report_dir, tag="v1", token=token, endpoint=live.url, retries=0)
    assert (again.commit_sha, again.created_commit) == (result.commit_sha, False)
    untagged = publish(filters_dir, REPO, report_dir=report_dir, token=token, endpoint=live.url, retries=0)
    assert (untagged.commit_sha, untagged.created_commit) == (result.commit_sha, False)
    assert len(api.list_repo_commits(REPO)) == commits

    # other filters under the same version tag are refused; under a new tag they make exactly one new commit
    other = QFilters(torch.randn(30, 3, 64), QFilters.from_pretrained(filters_dir).provenance)
    other_dir = other.save_pretrained(tmp_path / "other")
    with pytest.raises(HubConflictError, match="tag 'v1' already points at commit"):
        publish(other_dir, REPO, report_dir=report_dir, tag="v1", token=token, endpoint=live.url, retries=0)
    v2 = publish(other_dir, REPO, report_dir=report_dir, tag="v2", token=token, endpoint=live.url, retries=0)
    assert v2.created_commit and len(api.list_repo_commits(REPO)) == commits + 1
    pushed = other.push_to_hub(REPO, report_dir=report_dir, tag="v2", token=token, endpoint=live.url)
    assert (pushed.commit_sha, pushed.created_commit) == (v2.commit_sha, False)
    # every file went inline ('regular'): huggingface_hub never loaded hf_xet, for uploads or downloads
    assert "hf_xet" not in sys.modules


class _Failing(BaseHTTPRequestHandler):
    hits = 0

    def _fail(self) -> None:
        type(self).hits += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_HEAD = _fail  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


def test_hub_errors_are_clear_and_only_transient_ones_are_retried(live, filters_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "qft_not-a-real-token-0123456789"
    started = time.monotonic()
    with pytest.raises(HubAuthError) as refused:
        publish(filters_dir, REPO, token=secret, endpoint=live.url, retries=3, backoff=5.0)
    assert time.monotonic() - started < 5.0  # 401 is not retried (a retry would have slept 5 s)
    assert refused.value.status == 401 and not refused.value.retryable and "refused the token" in str(refused.value)

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(HubUnavailableError) as down:
            publish(filters_dir, REPO, token=secret, endpoint=f"http://127.0.0.1:{server.server_port}", retries=2,
                    backoff=0.01)
    finally:
        server.shutdown()
    assert down.value.retryable and down.value.status == 503
    assert _Failing.hits >= 3  # one try and two retries (huggingface_hub itself may retry some calls too)
    assert secret not in caplog.text and secret not in str(refused.value) and secret not in str(down.value)

    token_file = tmp_path / "hub-token"
    token_file.write_text(live.token("publish") + "\n")
    monkeypatch.setenv("QFILTERS_HUB_TOKEN_FILE", str(token_file))
    assert publish(filters_dir, REPO, endpoint=live.url, retries=0).created_commit  # the secret file's token


def test_remote_comparison_understands_regular_and_lfs_files() -> None:
    """huggingface.co reports large files by LFS sha256, small ones by git blob id: both count as unchanged."""
    from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

    from qfilters.hub import _diff, git_blob_id

    weights, config = b"\x00" * 4096, b'{"a": 1}'
    remote = {"model.safetensors": RepoSibling("model.safetensors", size=len(weights), blob_id="0" * 40,
                                               lfs=BlobLfsInfo(size=len(weights), sha256=hashlib.sha256(weights)
                                                               .hexdigest(), pointer_size=134)),
              "config.json": RepoSibling("config.json", size=len(config), blob_id=git_blob_id(config)),
              "report/old.png": RepoSibling("report/old.png", size=3, blob_id="1" * 40),
              ".gitattributes": RepoSibling(".gitattributes", size=10, blob_id="2" * 40)}
    assert _diff({"model.safetensors": weights, "config.json": config}, remote) == ([], ["report/old.png"])
    assert _diff({"model.safetensors": weights[:-1] + b"\x01", "config.json": config}, remote)[0] == \
        ["model.safetensors"]
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # what `git hash-object` says


def test_cli_publish(live, filters_dir: Path, report_dir: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(live.token("publish"))
    env = {**os.environ, "QFILTERS_HUB_TOKEN_FILE": str(token_file),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [str(Path(sys.executable).parent / "qfilters"), "publish", str(filters_dir), REPO, "--report",
               str(report_dir), "--tag", "v1", "--endpoint", live.url, "--json"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    import json

    one, two = json.loads(first.stdout), json.loads(again.stdout)
    assert one["created_commit"] and not two["created_commit"] and one["commit_sha"] == two["commit_sha"]
    token_file.write_text("qft_revoked-or-wrong")
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    said = " ".join(refused.stderr.split())  # rich wraps long lines
    assert refused.returncode == 1 and "refused the token" in said and "qft_revoked" not in said
