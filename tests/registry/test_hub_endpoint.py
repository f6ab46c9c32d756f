"""The registry's Hub-compatible endpoint, driven by stock huggingface_hub over real HTTP (uvicorn on loopback):
repos, commits, tags, trees, downloads with ranges, model search by tags, the Hub's error codes, and access rules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.registry.hub_server import LiveRegistry

CARD = """---
base_model: acme/base-7b
base_model_relation: adapter
library_name: qfilters
license: apache-2.0
datasets:
- wikitext
tags:
- q-filters
- kv-cache-compression
- {verdict}
---

# test card
"""


@pytest.fixture
def live(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveRegistry]:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token or cache from the machine
    monkeypatch.delenv("HF_TOKEN", raising=False)
    reg = LiveRegistry(database_url, tmp_path / "data")
    yield reg
    reg.stop()


def _push(api: HfApi, repo_id: str, files: dict[str, bytes], message: str = "add files") -> str:
    api.create_repo(repo_id, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in files.items()]
    return api.create_commit(repo_id, ops, commit_message=message).oid


def test_push_pull_refs_and_errors(live: LiveRegistry, tmp_path: Path) -> None:
    """Create, commit, tag, read back at every kind of revision; missing things raise the Hub's own exceptions."""
    api = HfApi(endpoint=live.url, token=live.token("publish"))
    weights = bytes(range(256)) * 40
    files = {"config.json": b'{"a": 1}\n', "model.safetensors": weights, "README.md": CARD.format(verdict="x").encode(),
             "report/report.md": b"# report\n", "report/fig/a.png": b"\x89PNG..."}
    first = _push(api, "acme/demo", files)
    api.create_tag("acme/demo", tag="v1", revision=first)
    second = _push(api, "acme/demo", {"config.json": b'{"a": 2}\n'}, "second")
    assert second != first and len(second) == 40

    info = api.model_info("acme/demo", files_metadata=True)
    assert info.sha == second and info.library_name == "qfilters"
    assert {s.rfilename for s in info.siblings} == set(files)
    assert "base_model:acme/base-7b" in info.tags and info.card_data.base_model == "acme/base-7b"
    assert api.model_info("acme/demo", revision="v1").sha == first
    assert [c.commit_id for c in api.list_repo_commits("acme/demo")][:2] == [second, first]
    refs = api.list_repo_refs("acme/demo")
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", first)]
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", second)]

    # the file tree, flat and recursive
    top = {(e.path, type(e).__name__) for e in api.list_repo_tree("acme/demo")}
    assert ("report", "RepoFolder") in top and ("config.json", "RepoFile") in top and len(top) == 4
    deep = {e.path for e in api.list_repo_tree("acme/demo", recursive=True)}
    assert {"report/fig", "report/fig/a.png", "report/report.md"} <= deep

    # downloads: the tag and the commit give the old bytes, main the new ones
    cache = tmp_path / "cache"
    for revision, expected in (("v1", b'{"a": 1}\n'), (first, b'{"a": 1}\n'), ("main", b'{"a": 2}\n')):
        path = hf_hub_download("acme/demo", "config.json", revision=revision, endpoint=live.url, cache_dir=cache)
        assert Path(path).read_bytes() == expected
    big = hf_hub_download("acme/demo", "model.safetensors", endpoint=live.url, cache_dir=cache)
    assert Path(big).read_bytes() == weights

    # byte ranges (hf_hub_download resumes with them) and the headers the client relies on
    url = f"{live.url}/acme/demo/resolve/{first}/model.safetensors"
    head = httpx.head(url)
    assert head.headers["x-repo-commit"] == first and head.headers["content-length"] == str(len(weights))
    part = httpx.get(url, headers={"Range": "bytes=100-"})
    assert part.status_code == 206 and part.content == weights[100:]
    assert part.headers["content-range"] == f"bytes 100-{len(weights) - 1}/{len(weights)}"
    assert httpx.get(url, headers={"Range": f"bytes={len(weights)}-"}).status_code == 416

    infos = api.get_paths_info("acme/demo", ["config.json", "report", "missing.txt"], revision=first)
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "config.json"), ("RepoFolder", "report")]
    assert api.file_exists("acme/demo", "report/fig/a.png") and not api.file_exists("acme/demo", "nope.txt")

    # deleting a folder and a tag
    api.create_commit("acme/demo", [CommitOperationDelete("report/")], commit_message="drop report")
    assert not any(s.rfilename.startswith("report/") for s in api.model_info("acme/demo").siblings)
    api.delete_tag("acme/demo", tag="v1")
    assert api.list_repo_refs("acme/demo").tags == []

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("acme/demo", revision="v9")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("acme/demo", "nope.bin", endpoint=live.url, cache_dir=cache)
    with pytest.raises(HfHubHTTPError) as stale:  # someone else moved main since the parent we name
        api.create_commit("acme/demo", [CommitOperationAdd("x.txt", b"x")], commit_message="x", parent_commit=first)
    assert stale.value.response.status_code == 412


def test_model_search_ands_tags(live: LiveRegistry) -> None:
    api = HfApi(endpoint=live.url, token=live.token("publish"))
    _push(api, "acme/pass-qfilters", {"README.md": CARD.format(verdict="qfilters-verdict:pass").encode()})
    _push(api, "acme/fail-qfilters", {"README.md": CARD.format(verdict="qfilters-verdict:fail").encode()})
    _push(api, "other/unrelated", {"README.md": b"---\ntags: [q-filters]\n---\n"})

    def ids(**kwargs) -> list[str]:
        return sorted(m.id for m in HfApi(endpoint=live.url).list_models(**kwargs))

    assert ids(filter=["q-filters", "base_model:acme/base-7b"]) == ["acme/fail-qfilters", "acme/pass-qfilters"]
    assert ids(filter=["q-filters", "base_model:acme/base-7b", "qfilters-verdict:pass"]) == ["acme/pass-qfilters"]
    assert ids(filter="q-filters") == ["acme/fail-qfilters", "acme/pass-qfilters", "other/unrelated"]
    assert ids(filter=["q-filters", "base_model:nobody/else"]) == []
    assert ids(author="other") == ["other/unrelated"]
    assert ids(search="PASS") == ["acme/pass-qfilters"]
    found = next(iter(HfApi(endpoint=live.url).list_models(filter="qfilters-verdict:pass", cardData=True)))
    assert found.last_modified is not None and found.card_data.license == "apache-2.0"
    assert {"license:apache-2.0", "dataset:wikitext", "base_model:adapter:acme/base-7b"} <= set(found.tags)
    page = list(HfApi(endpoint=live.url).list_models(filter="q-filters", limit=2))
    assert len(page) == 2


def test_access_rules(live: LiveRegistry) -> None:
    """Writes need the publish scope; private repos are invisible without a token."""
    reader = HfApi(endpoint=live.url, token=live.token("read"))
    with pytest.raises(HfHubHTTPError) as refused:
        reader.create_repo("acme/nope")
    assert refused.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as anonymous:
        HfApi(endpoint=live.url, token=False).create_repo("acme/nope")
    assert anonymous.value.response.status_code == 401

    writer = HfApi(endpoint=live.url, token=live.token("publish"))
    writer.create_repo("acme/secret", private=True)
    _push(writer, "acme/secret", {"a.txt": b"a"})
    assert reader.model_info("acme/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=live.url, token=False).model_info("acme/secret")
    assert [m.id for m in HfApi(endpoint=live.url, token=False).list_models()] == []
    assert [m.id for m in reader.list_models()] == ["acme/secret"]

    _push(writer, "acme/open", {"a.txt": b"a"})
    live.settings.public_reads = False  # QFILTERS_PUBLIC_READS=false: even public repos need a read token
    with pytest.raises(HfHubHTTPError) as unauthorized:
        HfApi(endpoint=live.url, token=False).model_info("acme/open")
    assert unauthorized.value.response.status_code == 401 and "read" in str(unauthorized.value)
    assert httpx.get(f"{live.url}/acme/open/resolve/main/a.txt").status_code == 401
    assert reader.model_info("acme/open").id == "acme/open"
    live.settings.public_reads = True

    bomb = "---\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\ntags: [*b]\n---\n"
    with pytest.raises(ValueError, match="aliases"):  # the client asks the endpoint to validate the card first
        _push(writer, "acme/open", {"README.md": bomb.encode()})

    bad_path = httpx.post(f"{live.url}/api/models/acme/secret/commit/main",
                          headers={"Authorization": f"Bearer {writer.token}", "Content-Type": "application/x-ndjson"},
                          content=b'{"key":"header","value":{"summary":"x"}}\n'
                                  b'{"key":"file","value":{"path":"../etc/passwd","content":"eA==","encoding":"base64"}}\n')
    assert bad_path.status_code == 400 and "not a valid file path" in bad_path.json()["error"]
    lfs = httpx.post(f"{live.url}/api/models/acme/secret/commit/main",
                     headers={"Authorization": f"Bearer {writer.token}"},
                     content=b'{"key":"header","value":{"summary":"x"}}\n'
                             b'{"key":"lfsFile","value":{"path":"w.bin","algo":"sha256","oid":"00"}}\n')
    assert lfs.status_code == 400 and "no LFS storage" in lfs.json()["detail"]
