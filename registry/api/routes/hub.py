"""The subset of the Hugging Face Hub HTTP API that stock ``huggingface_hub`` uses to push and pull model repos, so
``HfApi(endpoint=<registry>)``, ``hf_hub_download`` and ``snapshot_download`` work against the registry (air-gapped
teams, and the publisher's tests).

Repo creation, pre-upload (always ``regular``: files travel inline in the commit, never through LFS or Xet), NDJSON
commits, model info (at a revision), file trees, ``resolve`` (with ``X-Repo-Commit``, ``ETag``, sizes and ranges),
refs, commits, tags, model search (tags AND-ed, author, text) and card validation. Errors carry the Hub's
``X-Error-Code`` so clients raise their usual exceptions. Reads follow ``QFILTERS_PUBLIC_READS`` (private repos need a
token), writes need the ``publish`` scope. These routes are the Hub's contract, not ours: they stay out of our OpenAPI.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import mimetypes
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from registry.api.deps import Principal, SessionDep, StateDep, bearer, get_principal, require
from registry.api.headers import REPORT_CSP  # resolve serves anyone's upload on our origin: sandboxed, no scripts
from registry.api.present import base_url
from registry.errors import RegistryError
from registry.models import HubCommitFile, HubRepo
from registry.services import hubrepo
from registry.services.hubrepo import CommitRequest, HubError

router = APIRouter(include_in_schema=False)
REPO = "/api/models/{namespace}/{name}"
COMMIT_PATH = r"/api/models/[^/]+/[^/]+/commit/[^/]+"  # the one route whose bodies may exceed max_request_bytes
Flag = Annotated[bool, Query()]
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def install(app: FastAPI) -> None:
    """Mount the routes; their errors stay problem+json and also carry what huggingface_hub shows its users: the
    ``error`` member, ``X-Error-Message`` and the Hub's ``X-Error-Code``."""

    @app.exception_handler(HubError)
    async def hub_error(request: Request, exc: HubError) -> JSONResponse:
        body = {"type": "about:blank", "title": exc.title, "status": exc.status, "detail": exc.detail,
                "instance": request.url.path, "error": exc.detail, **exc.extra}
        headers = {"X-Error-Message": " ".join(exc.detail.split())[:500].encode("ascii", "replace").decode()}
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if exc.code:
            headers["X-Error-Code"] = exc.code
        if exc.commit:
            headers["X-Repo-Commit"] = exc.commit
        return JSONResponse(body, status_code=exc.status, media_type="application/problem+json", headers=headers)

    app.include_router(router)


def _access(scope: str, *, public_if_enabled: bool = False) -> Callable[..., Principal]:
    """The registry's token and scope checks, with their refusals answered the Hub's way."""
    checker = require(scope, public_if_enabled=public_if_enabled)

    def check(request: Request, session: SessionDep,
              credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
        try:
            return checker(request, get_principal(session, credentials))
        except HubError:
            raise
        except RegistryError as e:
            raise HubError(e.detail, status=e.status, title=e.title) from None

    return check


PublicRead = Annotated[Principal, Depends(_access("read", public_if_enabled=True))]
Publisher = Annotated[Principal, Depends(_access("publish"))]


def _loads(data: bytes, what: str) -> Any:
    """JSON of a request body or commit line; anything unparsable (deep nesting included) is the caller's 400."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise HubError(f"{what} is not valid JSON (or nests too deeply)", status=400) from None


async def _json_object(request: Request) -> dict[str, Any]:
    if not isinstance(value := _loads(await request.body(), "the request body"), dict):
        raise HubError("the request body must be a JSON object", status=400)
    return value


async def _published_body(request: Request, _principal: Publisher) -> dict[str, Any]:
    """A write's JSON body, read once the token holds ``publish`` (FastAPI reads declared bodies before auth)."""
    return await _json_object(request)


WriteBody = Annotated[dict[str, Any], Depends(_published_body)]


def hub_date(value: dt.datetime) -> str:
    value = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    value = value.astimezone(dt.timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _reader(principal: Principal) -> bool:
    return "read" in principal.scopes


def _repo_id(namespace: str, name: str) -> str:
    return hubrepo.check_repo_id(f"{namespace}/{name}")


def _repo_json(repo: HubRepo, sha: str | None, files: list[HubCommitFile] | None, *, blobs: bool = False,
               card: bool = True) -> dict[str, Any]:
    data: dict[str, Any] = {
        "_id": f"{repo.id:024x}", "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.author, "sha": sha,
        "lastModified": hub_date(repo.last_modified), "createdAt": hub_date(repo.created_at),
        "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
        "tags": hubrepo.tags_of(repo),
    }
    if repo.library_name:
        data["library_name"] = repo.library_name
    if card:
        data["cardData"] = repo.card_data or {}
    if files is not None:
        data["siblings"] = [{"rfilename": f.path, **({"size": f.size, "blobId": f.git_oid} if blobs else {})}
                            for f in files]
        data["usedStorage"] = sum(f.size for f in files)
    return data


# ------------------------------------------------------------------------------------------------ repos, cards


@router.post("/api/repos/create")
def create_repo(request: Request, session: SessionDep, principal: Publisher, body: WriteBody) -> JSONResponse:
    name, organization = body.get("name"), body.get("organization")
    if (body.get("type") or "model") != "model":
        raise HubError(f"this endpoint hosts model repos only, not {body.get('type')!r} repos", status=400)
    if not isinstance(name, str) or not (organization is None or isinstance(organization, str)):
        raise HubError("'name' (and 'organization' if given) must be strings", status=400)
    repo_id = f"{organization or principal.name}/{name}"
    flag, visibility = body.get("private"), body.get("visibility")
    if not (flag is None or isinstance(flag, bool)) or visibility not in (None, "private", "public"):
        raise HubError("'private' must be true or false (and 'visibility' 'private' or 'public')", status=400)
    private = visibility == "private" or flag is True
    repo, created = hubrepo.create_repo(session, repo_id, private=private, actor=principal.name)
    session.commit()
    url = f"{base_url(request)}/{repo.repo_id}"
    if not created:  # huggingface_hub's exist_ok reads the url of the existing repo from this answer
        raise HubError("You already created this model repo", status=409, extra={"url": url})
    return JSONResponse({"url": url, "name": repo.repo_id, "id": repo.repo_id})


@router.post("/api/validate-yaml")
def validate_yaml(body: Annotated[dict[str, Any], Depends(_json_object)]) -> JSONResponse:
    content = body.get("content")
    if not isinstance(content, str):
        return JSONResponse({"errors": [{"message": "'content' must be the README.md text"}], "warnings": []}, 400)
    try:
        hubrepo.front_matter(content)
    except Exception as e:  # noqa: BLE001 - any YAML error is the card's fault, reported to the client
        return JSONResponse({"errors": [{"message": " ".join(str(e).split())[:500]}], "warnings": []}, 400)
    return JSONResponse({"errors": [], "warnings": []})


@router.get("/api/whoami-v2")
def whoami(principal: Publisher) -> dict[str, Any]:
    role = "write" if "publish" in principal.scopes else "read"
    return {"type": "user", "name": principal.name, "fullname": principal.name, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": principal.name, "role": role}}}


@router.get("/api/models")
def list_models(request: Request, session: SessionDep, principal: PublicRead,
                filter: Annotated[list[str] | None, Query(max_length=20)] = None,
                author: Annotated[str | None, Query(max_length=96)] = None,
                search: Annotated[str | None, Query(max_length=200)] = None,
                sort: Annotated[str, Query(max_length=32)] = "lastModified",
                direction: Annotated[int, Query(ge=-1, le=1)] = -1,
                limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
                offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
                full: Flag = False, cardData: Flag = False) -> JSONResponse:  # noqa: N803 - the Hub's name
    """Search repos: every ``filter`` value must be one of the repo's tags (the Hub's AND semantics)."""
    tags = [t for value in filter or [] for t in value.split(",") if t]
    rows, more = hubrepo.search(session, tags=tags, author=author, text=search, sort=sort, descending=direction != 1,
                                limit=limit, offset=offset, authenticated=_reader(principal))
    items = []
    heads = hubrepo.heads_of(session, rows)
    for repo in rows:
        head = heads.get(repo.id)
        files = hubrepo.files_at(session, head) if full and head else None
        items.append(_repo_json(repo, head, files, card=full or cardData))
    headers = {}
    if more:
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "offset"] + [("offset", offset + limit)]
        headers["Link"] = f'<{base_url(request)}/api/models?{urlencode(params)}>; rel="next"'
    return JSONResponse(items, headers=headers)


@router.get(REPO)
@router.get(REPO + "/revision/{revision}")
def model_info(namespace: str, name: str, session: SessionDep, principal: PublicRead, revision: str = "main",
               blobs: Flag = False) -> dict[str, Any]:
    repo = hubrepo.get_repo(session, _repo_id(namespace, name), authenticated=_reader(principal))
    sha = hubrepo.resolve(session, repo, revision)
    return _repo_json(repo, sha, hubrepo.files_at(session, sha), blobs=blobs)


# ---------------------------------------------------------------------------------------------- trees and refs


@router.get(REPO + "/tree/{revision}")
@router.get(REPO + "/tree/{revision}/{path:path}")
def tree(namespace: str, name: str, revision: str, session: SessionDep, principal: PublicRead, path: str = "",
         recursive: Flag = False) -> list[dict[str, Any]]:
    repo = hubrepo.get_repo(session, _repo_id(namespace, name), authenticated=_reader(principal))
    sha = hubrepo.resolve(session, repo, revision)
    files = hubrepo.files_at(session, sha)
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    inside = [f for f in files if f.path.startswith(prefix)]
    if prefix and not inside:
        raise hubrepo.EntryNotFound(f"{repo.repo_id}@{revision} has no folder {path!r}", commit=sha)
    entries: dict[str, dict[str, Any]] = {}
    folders: dict[str, list[str]] = {}
    for f in inside:
        parts = f.path[len(prefix):].split("/")
        depth = len(parts) - 1 if recursive else min(len(parts) - 1, 1)
        for i in range(1, depth + 1):
            folders.setdefault(prefix + "/".join(parts[:i]), []).append(f"{f.path}:{f.git_oid}")
        if recursive or len(parts) == 1:
            entries[f.path] = {"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path}
    for folder, content in folders.items():
        oid = hashlib.sha1("\n".join(sorted(content)).encode()).hexdigest()
        entries[folder] = {"type": "directory", "oid": oid, "size": 0, "path": folder}
    return [entries[key] for key in sorted(entries)]


@router.post(REPO + "/paths-info/{revision}")
async def paths_info(namespace: str, name: str, revision: str, request: Request, session: SessionDep,
                     principal: PublicRead) -> list[dict[str, Any]]:
    """Files and folders among ``paths`` (form field, repeated) at a revision; unknown paths are left out."""
    # the client sends a url-encoded form; parsed here to spare a multipart dependency
    wanted = parse_qs((await request.body()).decode("utf-8", "replace")).get("paths", [])[:1000]

    def look() -> list[dict[str, Any]]:
        repo = hubrepo.get_repo(session, _repo_id(namespace, name), authenticated=_reader(principal))
        sha = hubrepo.resolve(session, repo, revision)
        files = {f.path: f for f in hubrepo.files_at(session, sha)}
        out = []
        for path in dict.fromkeys(p.strip("/") for p in wanted):
            if path in files:
                f = files[path]
                out.append({"type": "file", "oid": f.git_oid, "size": f.size, "path": path})
            elif any(p.startswith(path + "/") for p in files):
                listing = "\n".join(sorted(f"{p}:{f.git_oid}" for p, f in files.items() if p.startswith(path + "/")))
                out.append({"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0,
                            "path": path})
        return out

    return await run_in_threadpool(look)


@router.get(REPO + "/refs")
def list_refs(namespace: str, name: str, session: SessionDep, principal: PublicRead) -> dict[str, Any]:
    repo = hubrepo.get_repo(session, _repo_id(namespace, name), authenticated=_reader(principal))
    out: dict[str, list[dict[str, str]]] = {"branches": [], "converts": [], "tags": [], "pullRequests": []}
    for ref in hubrepo.refs(session, repo):
        kind = "heads" if ref.kind == "branch" else "tags"
        out["branches" if ref.kind == "branch" else "tags"].append(
            {"name": ref.name, "ref": f"refs/{kind}/{ref.name}", "targetCommit": ref.commit_sha})
    return out


@router.get(REPO + "/commits/{revision}")
def list_commits(namespace: str, name: str, revision: str, session: SessionDep,
                 principal: PublicRead) -> list[dict[str, Any]]:
    repo = hubrepo.get_repo(session, _repo_id(namespace, name), authenticated=_reader(principal))
    return [{"id": c.sha, "title": c.title, "message": c.message, "authors": [{"user": c.author, "avatar": None}],
             "date": hub_date(c.created_at)} for c in hubrepo.history(session, repo, revision)]


@router.post(REPO + "/tag/{revision}")
def create_tag(namespace: str, name: str, revision: str, session: SessionDep, principal: Publisher,
               body: WriteBody) -> dict[str, Any]:
    repo = hubrepo.get_repo(session, _repo_id(namespace, name), authenticated=True)
    tag, message = body.get("tag"), body.get("message")
    if not isinstance(tag, str) or not (message is None or isinstance(message, str)):
        raise HubError("'tag' must be a string (and 'message' too if given)", status=400)
    sha = hubrepo.create_tag(session, repo, tag, revision, message=message, actor=principal.name)
    session.commit()
    return {"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": sha}


@router.delete(REPO + "/tag/{tag}")
def delete_tag(namespace: str, name: str, tag: str, session: SessionDep, principal: Publisher) -> dict[str, Any]:
    repo = hubrepo.get_repo(session, _repo_id(namespace, name), authenticated=True)
    hubrepo.delete_tag(session, repo, tag, actor=principal.name)
    session.commit()
    return {}


# ------------------------------------------------------------------------------------------- uploads, commits


@router.post(REPO + "/preupload/{revision}")
def preupload(namespace: str, name: str, revision: str, session: SessionDep, principal: Publisher,
              body: WriteBody) -> dict[str, Any]:
    repo = hubrepo.get_repo(session, _repo_id(namespace, name), authenticated=True)
    files = body.get("files")
    if not isinstance(files, list) or len(files) > 1000 or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str) for f in files):
        raise HubError("'files' must be a list (at most 1000) of objects with a 'path'", status=400)
    return {"files": hubrepo.preupload(session, repo, revision, [f["path"] for f in files]), "commitOid": None}


@router.post(REPO + "/commit/{revision}")
async def commit(namespace: str, name: str, revision: str, request: Request, session: SessionDep,
                 state: StateDep, principal: Publisher) -> JSONResponse:
    """One NDJSON commit: a header line, then one line per added (base64, inline) or deleted file."""
    if request.query_params.get("create_pr") in ("1", "true", "True"):
        raise HubError("pull requests are not supported by this endpoint; commit to a branch", status=400)
    repo_id = _repo_id(namespace, name)
    parsed = parse_commit(await request.body())

    def write() -> str:
        repo = hubrepo.get_repo(session, repo_id, authenticated=True)
        sha = hubrepo.commit(session, state.store, repo, revision, parsed, actor=principal.name)
        session.commit()
        return sha

    sha = await run_in_threadpool(write)
    return JSONResponse({"success": True, "commitOid": sha, "commitUrl": f"{base_url(request)}/{repo_id}/commit/{sha}",
                         "commitMessage": parsed.summary, "hookOutput": "", "pullRequestUrl": None})


def parse_commit(body: bytes) -> CommitRequest:
    header: dict[str, Any] | None = None
    additions: dict[str, bytes] = {}
    deletions: list[str] = []
    folders: list[str] = []
    for number, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        if len(additions) + len(deletions) + len(folders) >= hubrepo.MAX_COMMIT_FILES:
            raise HubError(f"a commit holds at most {hubrepo.MAX_COMMIT_FILES} file operations; split the upload "
                           "into several commits (huggingface_hub's upload_large_folder does)", status=413)
        item = _loads(line, f"line {number} of the commit (NDJSON)")
        value = item.get("value") if isinstance(item, dict) else None
        if not isinstance(value, dict):
            raise HubError(f"line {number} of the commit must be {{'key': ..., 'value': {{...}}}}", status=400)
        key = item.get("key")
        if key == "header":
            header = value
            continue
        path = value.get("path")
        if not isinstance(path, str):
            raise HubError(f"line {number} of the commit has no 'path'", status=400)
        if key == "file":
            additions[hubrepo.check_path(path)] = _content(value, number)
        elif key == "deletedFile":
            deletions.append(path)
        elif key == "deletedFolder":
            folders.append(path)
        elif key == "lfsFile":
            raise HubError("this endpoint has no LFS storage: files go inline in the commit (pre-upload answers "
                           "'regular' for every file)", status=400)
        else:
            raise HubError(f"line {number}: unknown commit operation {key!r}", status=400)
    summary = header.get("summary") if header else None
    if not isinstance(summary, str) or not summary.strip():
        raise HubError("the commit needs a header line with a non-empty 'summary'", status=400)
    description, parent = header.get("description") or "", header.get("parentCommit")  # type: ignore[union-attr]
    if not isinstance(description, str) or not (parent is None or isinstance(parent, str)):
        raise HubError("the commit header's 'description' and 'parentCommit' must be strings", status=400)
    return CommitRequest(summary.strip(), description, parent, additions, deletions, folders)


def _content(value: dict[str, Any], number: int) -> bytes:
    content, encoding = value.get("content"), value.get("encoding", "utf-8")
    if not isinstance(content, str):
        raise HubError(f"line {number} of the commit has no 'content'", status=400)
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise HubError(f"line {number}: 'content' is not valid base64", status=400) from None
    return content.encode("utf-8")


# --------------------------------------------------------------------------------------------------- downloads


@router.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
def resolve_file(namespace: str, name: str, revision: str, path: str, request: Request, session: SessionDep,
                 state: StateDep, principal: PublicRead) -> Response:
    """A file at a revision, with the headers hf_hub_download relies on; byte ranges resume partial downloads."""
    repo = hubrepo.get_repo(session, _repo_id(namespace, name), authenticated=_reader(principal))
    sha = hubrepo.resolve(session, repo, revision)
    f = hubrepo.file_at(session, repo, sha, path)
    etag = f'"{f.git_oid}"'
    immutable = revision == sha
    headers = {"X-Repo-Commit": sha, "ETag": etag, "Accept-Ranges": "bytes",
               "Content-Type": mimetypes.guess_type(path)[0] or "application/octet-stream",
               "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1], safe='')}",
               "Cache-Control": "public, max-age=31536000, immutable" if immutable else "no-cache",
               "Content-Security-Policy": REPORT_CSP}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    start, end, status = 0, f.size - 1, 200
    wanted = request.headers.get("range")
    match = _RANGE.match(wanted.strip()) if wanted else None
    if match and (match.group(1) or match.group(2)):
        if match.group(1):
            start = int(match.group(1))
            end = min(int(match.group(2)), f.size - 1) if match.group(2) else f.size - 1
        else:  # the last N bytes
            start = max(f.size - int(match.group(2)), 0)
        if start >= f.size or start > end:
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{f.size}"})
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
    headers["Content-Length"] = str(end - start + 1 if f.size else 0)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    return StreamingResponse(_chunks(state.store.path_for(f.blob_sha256), start, end - start + 1),
                             status_code=status, headers=headers)


def _chunks(path: Path, start: int, length: int, size: int = 1 << 20) -> Iterator[bytes]:
    """A byte range of a stored file, a megabyte at a time (large files never sit whole in memory)."""
    with open(path, "rb") as f:
        f.seek(start)
        while length > 0:
            chunk = f.read(min(size, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk
