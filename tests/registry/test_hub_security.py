"""Hostile requests to the Hub-compatible endpoint over real HTTP (uvicorn on loopback): body sizes and the order of
authorization and parsing, sandboxed downloads, trees git cannot hold, strict repo flags, and honest error titles."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from registry.services import hubrepo
from tests.registry.hub_server import LiveRegistry

LIMIT = 64 * 1024  # QFILTERS_MAX_REQUEST_BYTES for these tests; commits may reach 4 MiB


@pytest.fixture
def live(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveRegistry]:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    reg = LiveRegistry(database_url, tmp_path / "data", max_request_bytes=LIMIT, hub_max_commit_bytes=4 << 20)
    yield reg
    reg.stop()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _ndjson(*lines: dict) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _add(path: str, data: bytes) -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}}


HEADER = {"key": "header", "value": {"summary": "x"}}


def test_large_bodies_only_for_authenticated_commits(live: LiveRegistry) -> None:
    """F1: the commit limit is not a licence to post big JSON anywhere under /api/, nor anonymously."""
    token = live.token("publish")
    HfApi(endpoint=live.url, token=token).create_repo("acme/big")
    big_json = b'{"name": "' + b"x" * (LIMIT * 3) + b'"}'
    for path in ("/api/repos/create", "/api/models/acme/big/preupload/main", "/api/models/acme/big/tag/main"):
        for headers in ({}, _auth(token)):
            answer = httpx.post(live.url + path, content=big_json, headers={"Content-Type": "application/json",
                                                                            **headers})
            assert answer.status_code == 413, (path, headers, answer.text)
    commit = _ndjson(HEADER, _add("w.bin", b"w" * LIMIT * 2))
    anonymous = httpx.post(f"{live.url}/api/models/acme/big/commit/main", content=commit)
    assert anonymous.status_code == 413
    pushed = httpx.post(f"{live.url}/api/models/acme/big/commit/main", content=commit, headers=_auth(token))
    assert pushed.status_code == 200, pushed.text


def test_authorization_before_the_body_is_read(live: LiveRegistry) -> None:
    """F1: without a token the write routes answer 401 whatever the body; the body is never parsed first."""
    reader = live.token("read")
    for path in ("/api/repos/create", "/api/models/acme/x/preupload/main", "/api/models/acme/x/tag/main",
                 "/api/models/acme/x/commit/main"):
        for body in (b"{not json", b"[" * 5000, b'"a string"'):
            answer = httpx.post(live.url + path, content=body, headers={"Content-Type": "application/json"})
            assert answer.status_code == 401, (path, body[:10], answer.text)
            assert answer.headers["x-error-message"]
            assert httpx.post(live.url + path, content=body, headers=_auth(reader)).status_code == 403


def test_resolve_is_sandboxed(live: LiveRegistry, tmp_path: Path) -> None:
    """F2: an uploaded page or image cannot run scripts on the registry's origin; downloads still work."""
    api = HfApi(endpoint=live.url, token=live.token("publish"))
    api.create_repo("acme/xss")
    evil_html = b"<html><script>fetch('/v1/tokens')</script><style>p{color:red}</style><p>hi</p></html>"
    evil_svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    api.create_commit("acme/xss", [CommitOperationAdd("report/evil.html", evil_html),
                                   CommitOperationAdd("report/evil.svg", evil_svg)], commit_message="evil")
    for path, body in (("report/evil.html", evil_html), ("report/evil.svg", evil_svg)):
        for method in ("GET", "HEAD"):
            answer = httpx.request(method, f"{live.url}/acme/xss/resolve/main/{path}")
            assert answer.status_code == 200
            assert answer.headers["x-content-type-options"] == "nosniff"
            policy = [p.strip() for p in answer.headers["content-security-policy"].split(";")]
            assert policy[0] == "sandbox" and "default-src 'none'" in policy and "script-src" not in str(policy)
            assert "img-src data:" in policy and "style-src 'unsafe-inline'" in policy
        from huggingface_hub import hf_hub_download

        local = hf_hub_download("acme/xss", path, endpoint=live.url, cache_dir=tmp_path / "cache")
        assert Path(local).read_bytes() == body


def test_a_path_is_never_both_file_and_folder(live: LiveRegistry) -> None:
    """F4: git cannot hold a tree where a path is a file and a folder, whichever commit brings the clash."""
    api = HfApi(endpoint=live.url, token=live.token("publish"))
    api.create_repo("acme/tree")
    api.create_commit("acme/tree", [CommitOperationAdd("weights.bin", b"w"), CommitOperationAdd("report/a.md", b"a")],
                      commit_message="first")
    head = api.model_info("acme/tree").sha
    for ops in ([CommitOperationAdd("weights.bin/x", b"x")],  # under an existing file
                [CommitOperationAdd("report", b"r")],  # a file over an existing folder
                [CommitOperationAdd("zz", b"z"), CommitOperationAdd("zz/y", b"y")]):  # both in one commit
        with pytest.raises(HfHubHTTPError) as refused:
            api.create_commit("acme/tree", ops, commit_message="clash")
        assert refused.value.response.status_code == 400
        problem = refused.value.response.json()
        assert "both a file and a folder" in problem["error"] and problem["title"] == "Bad request"
        assert problem["status"] == 400 and refused.value.response.headers["x-error-message"]
    assert api.model_info("acme/tree").sha == head  # nothing half-written


def test_commit_file_cap_and_deep_json(live: LiveRegistry) -> None:
    """F5 and F12: too many files in one commit, and deeply nested NDJSON, are the client's error, never a 500."""
    token = live.token("publish")
    HfApi(endpoint=live.url, token=token).create_repo("acme/many")
    url = f"{live.url}/api/models/acme/many/commit/main"
    cap = hubrepo.MAX_COMMIT_FILES
    body = _ndjson(HEADER, *(_add(f"f{i}", b"x") for i in range(cap + 1)))
    too_many = httpx.post(url, headers=_auth(token), content=body)
    assert too_many.status_code == 413 and f"at most {cap} file operations" in too_many.json()["error"]
    assert too_many.json()["title"] == "Request too large"
    assert HfApi(endpoint=live.url, token=token).list_repo_files("acme/many") == []  # nothing half-written
    assert httpx.post(url, headers=_auth(token),
                      content=_ndjson(HEADER, *(_add(f"f{i}", b"x") for i in range(50)))).status_code == 200
    deep = b'{"key": "file", "value": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    nested = httpx.post(url, headers=_auth(token), content=_ndjson(HEADER) + deep)
    assert nested.status_code == 400 and "line 2" in nested.json()["error"]
    assert nested.headers["content-type"].startswith("application/problem+json")
    deep_tag = httpx.post(f"{live.url}/api/models/acme/many/tag/main", headers=_auth(token),
                          content=b"[" * 20_000 + b"]" * 20_000)
    assert deep_tag.status_code == 400 and deep_tag.json()["title"] == "Bad request"


def test_private_flag_is_strict(live: LiveRegistry) -> None:
    """F7: anything but a JSON boolean for 'private' is refused rather than read as 'public'."""
    token = live.token("publish")
    for value in ("yes", 1, "true", [], {}):
        answer = httpx.post(f"{live.url}/api/repos/create", headers=_auth(token),
                            json={"name": "maybe", "organization": "acme", "private": value})
        assert answer.status_code == 400 and "'private' must be true or false" in answer.json()["error"], value
    bad_visibility = httpx.post(f"{live.url}/api/repos/create", headers=_auth(token),
                                json={"name": "maybe", "organization": "acme", "visibility": "hidden"})
    assert bad_visibility.status_code == 400
    assert [m.id for m in HfApi(endpoint=live.url, token=token).list_models()] == []  # nothing was created
    HfApi(endpoint=live.url, token=token).create_repo("acme/maybe", private=True)
    assert HfApi(endpoint=live.url, token=token).model_info("acme/maybe").private is True


def test_error_titles_match_status(live: LiveRegistry) -> None:
    """F13: 409 and 412 say so in their titles; an existing repo is a problem+json 409 that exist_ok still accepts."""
    token = live.token("publish")
    api = HfApi(endpoint=live.url, token=token)
    first = api.create_repo("acme/titles")
    again = httpx.post(f"{live.url}/api/repos/create", headers=_auth(token),
                       json={"name": "titles", "organization": "acme"})
    assert again.status_code == 409 and again.headers["content-type"].startswith("application/problem+json")
    assert again.json()["title"] == "Conflict" and again.json()["url"] == f"{live.url}/acme/titles"
    assert again.json()["error"] and again.json()["status"] == 409
    assert str(api.create_repo("acme/titles", exist_ok=True)) == str(first)

    head = api.model_info("acme/titles").sha
    api.create_tag("acme/titles", tag="v1")
    tag = httpx.post(f"{live.url}/api/models/acme/titles/tag/main", headers=_auth(token), json={"tag": "v1"})
    assert tag.status_code == 409 and tag.json()["title"] == "Conflict"
    api.create_commit("acme/titles", [CommitOperationAdd("a.txt", b"a")], commit_message="move main")
    stale = httpx.post(f"{live.url}/api/models/acme/titles/commit/main", headers=_auth(token),
                       content=_ndjson({"key": "header", "value": {"summary": "x", "parentCommit": head}}))
    assert stale.status_code == 412 and stale.json()["title"] == "Precondition failed"
    broken = httpx.post(f"{live.url}/api/models/acme/titles/preupload/main", headers=_auth(token), content=b"{nope")
    assert broken.status_code == 400 and broken.json()["title"] == "Bad request"


def test_wrong_method_says_which_are_allowed(live: LiveRegistry) -> None:
    """F13: a 405 names the methods the route takes (RFC 9110), in a problem titled for its status."""
    answer = httpx.put(f"{live.url}/api/repos/create", json={})
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"
    assert answer.json()["title"] == "Method not allowed"
