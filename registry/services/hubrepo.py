"""Model repos of the registry's Hub-compatible endpoint: repos, immutable commits, branches and tags, in SQL, with
file contents in the content-addressed artifact store.

A commit stores its full file listing (path -> blob), so any revision's tree is one indexed query and nothing is ever
rewritten. Commit ids are the sha1 of the commit's parent, files, message, author and time (40 hex digits, like git's,
so huggingface_hub treats them as immutable revisions). Repo tags are derived from README.md's front matter at the
head of ``main`` the way the Hub derives them (card tags, library, ``base_model:<id>``, ``license:``, ``dataset:``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, selectinload

from registry.db import execute_dml
from registry.errors import RegistryError
from registry.models import Blob, HubCommit, HubCommitFile, HubRef, HubRepo, HubRepoTag, utcnow
from registry.services import audit
from registry.services.upsert import insert_ignore
from registry.store import ArtifactStore

DEFAULT_BRANCH = "main"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
MAX_TAGS = 100
MAX_COMMIT_FILES = 10_000  # operations per commit; larger uploads go in several commits (upload_large_folder does)
_TITLES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found", 409: "Conflict",
           412: "Precondition failed", 413: "Request too large", 422: "Unprocessable request"}


class HubError(RegistryError):
    """An error of the Hub endpoint: ``code`` is the Hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, ...)."""

    code: str | None = None

    def __init__(self, detail: str, *, status: int | None = None, code: str | None = None,
                 commit: str | None = None, title: str | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        if status is not None:
            self.status = status
            self.title = _TITLES.get(status, "Error")  # the title always names the status it comes with
        if title is not None:
            self.title = title
        self.extra = extra or {}  # more members of the answer (the Hub's ``url`` of an existing repo)
        if code is not None:
            self.code = code
        self.commit = commit  # X-Repo-Commit of a missing entry, so clients can cache its absence


class RepoNotFound(HubError):
    status, title, code = 404, "Repository not found", "RepoNotFound"


class RevisionNotFound(HubError):
    status, title, code = 404, "Revision not found", "RevisionNotFound"


class EntryNotFound(HubError):
    status, title, code = 404, "Entry not found", "EntryNotFound"


# ------------------------------------------------------------------------------------------------------- names


def check_name(part: str, what: str) -> str:
    if not _NAME.fullmatch(part) or ".." in part or part.endswith((".", "-", ".git")):
        raise HubError(f"{what} {part!r} is not valid: letters, digits, '.', '_', '-' (at most 96 characters, no "
                       "leading '.' or '-', no '..')", status=400)
    return part


def check_repo_id(repo_id: str) -> str:
    namespace, _, name = repo_id.partition("/")
    if not name:
        raise HubError(f"repo id {repo_id!r} needs a namespace: 'org/name'", status=400)
    check_name(namespace, "namespace")
    check_name(name, "repo name")
    return repo_id


def check_path(path: str) -> str:
    """A file path inside a repo: relative, no '..' or empty segments, no control characters, not under .git."""
    parts = path.split("/")
    if (not path or len(path) > 500 or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts)
            or parts[0] == ".git" or any(ord(c) < 32 or ord(c) == 127 for c in path)):
        raise HubError(f"{path[:200]!r} is not a valid file path in a repo (relative, '/'-separated, no '..')",
                       status=400)
    return path


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag) or ".." in tag or tag.endswith((".", ".lock")) or _COMMIT.fullmatch(tag):
        raise HubError(f"tag {tag!r} is not valid: letters, digits, '.', '_', '+', '-' (at most 100 characters)",
                       status=400)
    return tag


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ------------------------------------------------------------------------------------------------------- repos


def can_read(repo: HubRepo, *, authenticated: bool) -> bool:
    return not repo.private or authenticated


def get_repo(session: Session, repo_id: str, *, authenticated: bool) -> HubRepo:
    """The repo; a private repo is 'not found' for callers without a token, as on the Hub."""
    repo = session.scalar(select(HubRepo).where(HubRepo.repo_id == repo_id))
    if repo is None or not can_read(repo, authenticated=authenticated):
        raise RepoNotFound(f"repository {repo_id!r} not found (or private: send a token)")
    return repo


def create_repo(session: Session, repo_id: str, *, private: bool, actor: str) -> tuple[HubRepo, bool]:
    """Create the repo with an empty initial commit on ``main``; returns (repo, created)."""
    check_repo_id(repo_id)
    existing = session.scalar(select(HubRepo).where(HubRepo.repo_id == repo_id))
    if existing is not None:
        return existing, False
    now = utcnow()
    insert_ignore(session, HubRepo, {"repo_id": repo_id, "author": repo_id.split("/")[0], "private": private,
                                     "created_by": actor, "created_at": now, "last_modified": now,
                                     "card_data": {}}, ["repo_id"])
    repo = session.scalar(select(HubRepo).where(HubRepo.repo_id == repo_id))
    assert repo is not None
    if session.scalar(select(HubRef).where(HubRef.repo_pk == repo.id)) is not None:
        return repo, False  # a concurrent creator won the race
    sha = _new_commit(session, repo, None, {}, "initial commit", "", actor, now)
    insert_ignore(session, HubRef, {"repo_pk": repo.id, "kind": "branch", "name": DEFAULT_BRANCH, "commit_sha": sha,
                                    "updated_at": now}, ["repo_pk", "kind", "name"])  # a racing creator may win
    audit.record(session, actor, "hub.repo.create", "hub_repo", repo.id, repo_id=repo_id, private=private)
    session.flush()
    return repo, True


# --------------------------------------------------------------------------------------------------- revisions


def resolve(session: Session, repo: HubRepo, revision: str) -> str:
    """The commit sha a branch, tag or commit id names."""
    ref = session.scalar(select(HubRef.commit_sha).where(HubRef.repo_pk == repo.id, HubRef.name == revision)
                         .order_by(HubRef.kind))  # branch before tag, as git does
    if ref is not None:
        return ref
    if _COMMIT.fullmatch(revision) and session.scalar(select(HubCommit.sha).where(
            HubCommit.sha == revision, HubCommit.repo_pk == repo.id)) is not None:
        return revision
    raise RevisionNotFound(f"repository {repo.repo_id!r} has no revision {revision!r} (branches, tags or commit ids)")


def files_at(session: Session, commit_sha: str) -> list[HubCommitFile]:
    return list(session.scalars(select(HubCommitFile).where(HubCommitFile.commit_sha == commit_sha)
                                .order_by(HubCommitFile.path)).all())


def file_at(session: Session, repo: HubRepo, commit_sha: str, path: str) -> HubCommitFile:
    row = session.get(HubCommitFile, (commit_sha, path))
    if row is None:
        raise EntryNotFound(f"{repo.repo_id}@{commit_sha[:12]} has no file {path!r}", commit=commit_sha)
    return row


def commit_row(session: Session, sha: str) -> HubCommit:
    row = session.get(HubCommit, sha)
    assert row is not None
    return row


def history(session: Session, repo: HubRepo, revision: str, limit: int = 1000) -> list[HubCommit]:
    """Commits reachable from ``revision``, newest first."""
    sha: str | None = resolve(session, repo, revision)
    rows = {c.sha: c for c in session.scalars(select(HubCommit).where(HubCommit.repo_pk == repo.id)).all()}
    out: list[HubCommit] = []
    while sha is not None and sha in rows and len(out) < limit:
        out.append(rows[sha])
        sha = rows[sha].parent_sha
    return out


def refs(session: Session, repo: HubRepo) -> list[HubRef]:
    return list(session.scalars(select(HubRef).where(HubRef.repo_pk == repo.id)
                                .order_by(HubRef.kind, HubRef.name)).all())


def create_tag(session: Session, repo: HubRepo, tag: str, revision: str, *, message: str | None, actor: str) -> str:
    check_tag(tag)
    sha = resolve(session, repo, revision)
    if session.get(HubRef, (repo.id, "tag", tag)) is not None:
        raise HubError(f"tag {tag!r} already exists in {repo.repo_id}", status=409)
    insert_ignore(session, HubRef, {"repo_pk": repo.id, "kind": "tag", "name": tag, "commit_sha": sha,
                                    "message": message, "updated_at": utcnow()}, ["repo_pk", "kind", "name"])
    if session.get(HubRef, (repo.id, "tag", tag)).commit_sha != sha:  # type: ignore[union-attr]
        raise HubError(f"tag {tag!r} already exists in {repo.repo_id}", status=409)
    audit.record(session, actor, "hub.tag.create", "hub_repo", repo.id, tag=tag, commit=sha)
    return sha


def delete_tag(session: Session, repo: HubRepo, tag: str, *, actor: str) -> None:
    ref = session.get(HubRef, (repo.id, "tag", tag))
    if ref is None:
        raise RevisionNotFound(f"repository {repo.repo_id!r} has no tag {tag!r}")
    session.delete(ref)
    audit.record(session, actor, "hub.tag.delete", "hub_repo", repo.id, tag=tag, commit=ref.commit_sha)


# ----------------------------------------------------------------------------------------------------- commits


@dataclass(frozen=True)
class CommitRequest:
    """A parsed NDJSON commit: header fields, files to add (path -> bytes), paths and folders to delete."""

    summary: str
    description: str
    parent: str | None
    additions: dict[str, bytes]
    deletions: list[str]
    deleted_folders: list[str]


def preupload(session: Session, repo: HubRepo, revision: str, paths: list[str]) -> list[dict[str, Any]]:
    """Every file goes up 'regular' (inline in the commit), which keeps clients off LFS and Xet; ``oid`` is the
    current file's git blob id, which lets the client drop unchanged files from its commit."""
    current = {f.path: f.git_oid for f in files_at(session, resolve(session, repo, revision))}
    return [{"path": check_path(p), "uploadMode": "regular", "shouldIgnore": False, "oid": current.get(p)}
            for p in paths]


def commit(session: Session, store: ArtifactStore, repo: HubRepo, branch: str, request: CommitRequest, *,
           actor: str) -> str:
    """Apply ``request`` on top of ``branch``'s head as one new immutable commit; returns its sha."""
    ref = session.get(HubRef, (repo.id, "branch", branch))
    if ref is None:
        raise RevisionNotFound(f"repository {repo.repo_id!r} has no branch {branch!r} (commits go to a branch)")
    head = ref.commit_sha
    if request.parent is not None and request.parent != head:
        raise HubError(f"the branch {branch!r} moved: its head is {head}, not the parent commit {request.parent}; "
                       "fetch and retry", status=412)
    files = {f.path: (f.blob_sha256, f.git_oid, f.size) for f in files_at(session, head)}
    for path in request.deletions:
        if files.pop(check_path(path), None) is None:
            raise EntryNotFound(f"cannot delete {path!r}: A file with this name doesn't exist in {repo.repo_id}")
    for folder in request.deleted_folders:
        prefix = check_path(folder.rstrip("/")) + "/"
        for path in [p for p in files if p.startswith(prefix)]:
            del files[path]
    for path in request.additions:
        check_path(path)
    _refuse_file_folder_clashes(repo, set(files) | set(request.additions))
    for path, data in request.additions.items():
        sha256, size = store.put_bytes(data)
        insert_ignore(session, Blob, {"sha256": sha256, "size": size, "media_type": "application/octet-stream",
                                      "created_at": utcnow()}, ["sha256"])
        files[path] = (sha256, git_blob_id(data), size)
    now = utcnow()
    sha = _new_commit(session, repo, head, files, request.summary, request.description, actor, now)
    moved = execute_dml(session, update(HubRef).where(HubRef.repo_pk == repo.id, HubRef.kind == "branch",
                                                      HubRef.name == branch, HubRef.commit_sha == head)
                                 .values(commit_sha=sha, updated_at=now))
    if moved.rowcount != 1:
        raise HubError(f"the branch {branch!r} moved during the commit; retry", status=412)
    repo.last_modified = now
    if branch == DEFAULT_BRANCH:
        readme = files.get("README.md")
        update_card(session, repo, store.read_bytes(readme[0]).decode("utf-8", "replace") if readme else "")
    audit.record(session, actor, "hub.commit", "hub_repo", repo.id, commit=sha, branch=branch,
                 added=sorted(request.additions), deleted=sorted(request.deletions + request.deleted_folders))
    session.flush()
    return sha


def _refuse_file_folder_clashes(repo: HubRepo, paths: set[str]) -> None:
    """A path cannot be both a file and a folder (``w.bin`` and ``w.bin/x``): git cannot represent that tree."""
    folders = {path.rsplit("/", i)[0] for path in paths for i in range(1, path.count("/") + 1)}
    clashes = sorted(paths & folders)
    if clashes:
        raise HubError(f"{clashes[0]!r} would be both a file and a folder in {repo.repo_id} (a path cannot be both; "
                       "delete one of them in the same commit)", status=400)


def _new_commit(session: Session, repo: HubRepo, parent: str | None, files: dict[str, tuple[str, str, int]],
                title: str, message: str, author: str, at: dt.datetime) -> str:
    listing = sorted((p, f[1]) for p, f in files.items())
    canonical = json.dumps({"repo": repo.repo_id, "parent": parent, "files": listing,
                            "title": title, "message": message, "author": author, "at": at.isoformat()},
                           sort_keys=True, separators=(",", ":"))
    sha = hashlib.sha1(canonical.encode()).hexdigest()
    session.add(HubCommit(sha=sha, repo_pk=repo.id, parent_sha=parent, title=title[:10_000], message=message[:100_000],
                          author=author, created_at=at))
    session.flush()
    session.add_all(HubCommitFile(commit_sha=sha, path=p, blob_sha256=f[0], git_oid=f[1], size=f[2])
                    for p, f in files.items())
    return sha


# ------------------------------------------------------------------------------------------- card and search


MAX_FRONT_MATTER = 256 * 1024


def front_matter(readme: str) -> dict[str, Any]:
    """The YAML metadata of a model card ({} when absent); raises ValueError when the YAML is broken, too large, or
    uses aliases (which could expand a small card into gigabytes once turned into JSON)."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise ValueError("YAML aliases (*name) are not allowed in model card metadata")
            return super().compose_node(parent, index)

    text = readme.lstrip("\ufeff")
    if not text.startswith("---"):
        return {}
    match = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text[:MAX_FRONT_MATTER + 16], re.DOTALL)
    if match is None:
        raise ValueError("the YAML metadata block opened by '---' is never closed by another '---' line (or it "
                         f"is larger than {MAX_FRONT_MATTER} bytes)")
    try:
        data = yaml.load(match.group(1), Loader=NoAliasLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ValueError(f"the YAML metadata is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"the YAML metadata must be a mapping, not a {type(data).__name__}")
    return data


def derived_tags(meta: dict[str, Any]) -> list[str]:
    """The repo's tags as the Hub derives them from card metadata."""
    def strings(value: Any) -> list[str]:
        items = value if isinstance(value, list) else [value]
        return [str(v) for v in items if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v)]

    tags = strings(meta.get("tags", []))
    tags += strings(meta.get("library_name", []))
    relation = meta.get("base_model_relation")
    for base in strings(meta.get("base_model", [])):
        tags.append(f"base_model:{base}")
        if isinstance(relation, str) and relation:
            tags.append(f"base_model:{relation}:{base}")
    tags += [f"dataset:{d}" for d in strings(meta.get("datasets", []))]
    tags += [f"license:{lic}" for lic in strings(meta.get("license", []))]
    return [t[:200] for t in dict.fromkeys(tags)][:MAX_TAGS]


def update_card(session: Session, repo: HubRepo, readme: str) -> None:
    """Refresh the repo's card fields and tags from README.md (a broken card leaves them empty)."""
    try:
        meta = front_matter(readme)
    except ValueError:
        meta = {}
    meta = json.loads(json.dumps(meta, default=str))  # dates and other YAML types as JSON-able text
    repo.card_data = meta
    library = meta.get("library_name")
    repo.library_name = library[:100] if isinstance(library, str) else None
    session.execute(delete(HubRepoTag).where(HubRepoTag.repo_pk == repo.id))
    session.add_all(HubRepoTag(repo_pk=repo.id, tag=t, position=i) for i, t in enumerate(derived_tags(meta)))


def search(session: Session, *, tags: list[str], author: str | None, text: str | None, sort: str,
           descending: bool, limit: int, offset: int, authenticated: bool) -> tuple[list[HubRepo], bool]:
    """Repos carrying every tag in ``tags`` (AND), by author (namespace) and id substring; (page, more follow)."""
    query = select(HubRepo)
    if not authenticated:
        query = query.where(HubRepo.private.is_(False))
    for tag in dict.fromkeys(tags):
        query = query.where(HubRepo.id.in_(select(HubRepoTag.repo_pk).where(HubRepoTag.tag == tag)))
    if author:
        query = query.where(HubRepo.author == author)
    if text:
        escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(func.lower(HubRepo.repo_id).like(f"%{escaped}%", escape="\\"))
    column = {"createdAt": HubRepo.created_at, "id": HubRepo.repo_id}.get(sort, HubRepo.last_modified)
    order = (column.desc(), HubRepo.id.desc()) if descending else (column.asc(), HubRepo.id.asc())
    rows = list(session.scalars(query.options(selectinload(HubRepo.tags)).order_by(*order).limit(limit + 1)
                                .offset(offset)).all())
    return rows[:limit], len(rows) > limit


def heads_of(session: Session, repos: list[HubRepo]) -> dict[int, str]:
    """Head commit of ``main`` for each repo, in one query."""
    rows = session.execute(select(HubRef.repo_pk, HubRef.commit_sha).where(
        HubRef.repo_pk.in_([r.id for r in repos]), HubRef.kind == "branch", HubRef.name == DEFAULT_BRANCH))
    return {pk: sha for pk, sha in rows}


def tags_of(repo: HubRepo) -> list[str]:
    return [t.tag for t in repo.tags]
