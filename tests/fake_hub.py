"""A tiny in-process stand-in for the Hugging Face Hub's file-resolve endpoint.

It answers ``HEAD``/``GET /{owner}/{name}/resolve/{revision}/{filename}`` with the headers huggingface_hub relies on
(``X-Repo-Commit``, ``ETag``, ``Content-Length``) and the Hub's ``X-Error-Code`` values for missing repos, revisions,
files and gated repos, and ``GET /api/models?filter=...`` (the AND of tags, as the Hub does) for repos given tags.
Point ``endpoint=`` or ``HF_ENDPOINT`` at :attr:`FakeHub.url` to exercise the real download and search code paths
(cache layout, offline fallback, error mapping) without a network. ``add_dir(..., commit=, refs=)`` adds more versions
of a repo, reachable by commit sha or by one of ``refs`` (a tag such as ``v1``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.gated: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.tags: dict[str, list[str]] = {}  # repo -> tags answered by /api/models
        self.last_modified: dict[str, str] = {}  # repo -> ISO date answered by /api/models
        self.versions: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> commit -> files (besides COMMIT)
        self.refs: dict[str, dict[str, str]] = {}  # repo -> tag -> commit
        # (repo, filename) -> byte offset flipped on the wire, after the ETag was computed (corruption in transit)
        self.flip_in_transit: dict[tuple[str, str], int] = {}
        self.git_etags = False  # True: ETag = git blob sha1, as huggingface.co answers for files not in LFS
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_dir(self, repo_id: str, directory: Path, *, tags: list[str] | None = None, last_modified: str | None = None,
                commit: str | None = None, refs: tuple[str, ...] = ()) -> None:
        """Publish every file of a local directory as ``repo_id`` at :data:`COMMIT` (``main``), or at ``commit``."""
        files = {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}
        if commit is None:
            self.repos[repo_id] = files
        else:
            self.versions.setdefault(repo_id, {})[commit] = files
            self.repos.setdefault(repo_id, {})
        for ref in refs:
            self.refs.setdefault(repo_id, {})[ref] = commit or COMMIT
        if tags is not None:
            self.tags[repo_id] = list(tags)
        if last_modified is not None:
            self.last_modified[repo_id] = last_modified

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        url = urlsplit(handler.path)
        path = unquote(url.path)
        self.requests.append((handler.command, path))
        if path.rstrip("/") == "/api/models":
            return self._search(handler, parse_qs(url.query).get("filter", []))
        parts = path.strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(handler, 404, "RepoNotFound", "Not a resolve URL")
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo_id not in self.repos:
            return self._error(handler, 401, "RepoNotFound", "Repository not found")
        if repo_id in self.gated:
            return self._error(handler, 401, "GatedRepo", "Access to model is restricted, you must be authenticated")
        commit = self.refs.get(repo_id, {}).get(revision, revision)
        if commit == "main":
            commit = COMMIT
        files = self.repos[repo_id] if commit == COMMIT else self.versions.get(repo_id, {}).get(commit)
        if files is None:
            return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        content = files.get(filename)
        if content is None:
            return self._error(handler, 404, "EntryNotFound", f"{filename} does not exist on \"main\"", commit=commit)
        if self.git_etags:
            etag = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        else:
            etag = hashlib.sha256(content).hexdigest()
        flip = self.flip_in_transit.get((repo_id, filename))
        if flip is not None:
            content = content[:flip] + bytes([content[flip] ^ 0x01]) + content[flip + 1:]
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("ETag", f'"{etag}"')
        handler.send_header("Content-Length", str(len(content)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if body:
            handler.wfile.write(content)

    def _search(self, handler: BaseHTTPRequestHandler, wanted: list[str]) -> None:
        found = [{"id": repo, "modelId": repo, "tags": tags, "lastModified": self.last_modified.get(repo),
                  "private": False}
                 for repo, tags in self.tags.items() if all(t in tags for t in wanted)]
        payload = json.dumps(found).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    @staticmethod
    def _error(handler: BaseHTTPRequestHandler, status: int, code: str, message: str,
               commit: str | None = None) -> None:
        payload = f'{{"error": "{message}"}}'.encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        if commit:
            handler.send_header("X-Repo-Commit", commit)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(payload)
