"""Resolve, the service's hot path: "which filters for base model X (revision R)?".

Every client fetch starts here, so a hit costs one round trip: the candidate aliases of (model, revision) joined with
the filter set each points to, that set's aliases and its publications (the parts that can change). The files of a
filter set never change once written (versions are immutable), so they are kept in a :class:`FileCache` (one per
database), keyed by (id, sha256): an id reused after a deletion can never serve another set's files. A miss falls
back to :func:`registry.services.catalog.explain_unresolved`, which says what exists instead.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, bindparam, select
from sqlalchemy.orm import Session, aliased

from registry.models import Alias, BaseModel_, Blob, FilterSet, FilterSetFile, Publication
from registry.services.catalog import DEFAULT_RESOLVE_ALIASES, explain_unresolved


@dataclass(frozen=True)
class FileRow:
    name: str
    sha256: str
    size: int


@dataclass
class Resolution:
    """What an alias of (model, revision) points to: the filter set's columns, aliases, publications and files."""

    hf_id: str
    revision: str
    alias: str
    filter_set: dict[str, Any]
    aliases: list[str] = field(default_factory=list)
    publications: list[dict[str, Any]] = field(default_factory=list)
    files: tuple[FileRow, ...] = ()


class FileCache:
    """A small thread-safe LRU of immutable file listings, for one database."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._entries: OrderedDict[tuple[int, str], tuple[FileRow, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def get(self, key: tuple[int, str]) -> tuple[FileRow, ...] | None:
        with self._lock:
            files = self._entries.get(key)
            if files is not None:
                self._entries.move_to_end(key)
            return files

    def put(self, key: tuple[int, str], files: tuple[FileRow, ...]) -> None:
        with self._lock:
            self._entries[key] = files
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


_FS_COLUMNS = (FilterSet.id, FilterSet.model_id, FilterSet.version, FilterSet.sha256, FilterSet.num_layers,
               FilterSet.num_kv_heads, FilterSet.head_dim, FilterSet.verdict, FilterSet.verdict_detail,
               FilterSet.dataset_specs, FilterSet.job_id, FilterSet.created_at)
_PUBLICATION_COLUMNS = (Publication.id, Publication.repo_id, Publication.status, Publication.forced,
                        Publication.detail, Publication.url, Publication.created_at, Publication.tag,
                        Publication.commit_sha)


def _candidates_query() -> Select:
    """Built once: constructing a select is costlier than running it."""
    candidate, sibling = aliased(Alias), aliased(Alias)
    return (
        select(candidate.name.label("candidate"), BaseModel_.hf_id, BaseModel_.revision, *_FS_COLUMNS,
               sibling.name.label("sibling"), *(c.label(f"pub_{c.key}") for c in _PUBLICATION_COLUMNS))
        .select_from(candidate)
        .join(BaseModel_, candidate.model_id == BaseModel_.id)
        .join(FilterSet, candidate.filter_set_id == FilterSet.id)
        .outerjoin(sibling, sibling.filter_set_id == FilterSet.id)
        .outerjoin(Publication, Publication.filter_set_id == FilterSet.id)
        .where(BaseModel_.hf_id == bindparam("hf_id"), BaseModel_.revision == bindparam("revision"),
               candidate.name.in_(bindparam("names", expanding=True)))
    )


def _files_query() -> Select:
    return (select(FilterSetFile.name, FilterSetFile.blob_sha256, Blob.size)
            .join(Blob, Blob.sha256 == FilterSetFile.blob_sha256)
            .where(FilterSetFile.filter_set_id == bindparam("filter_set_id")).order_by(FilterSetFile.name))


_CANDIDATES_QUERY = _candidates_query()
_FILES_QUERY = _files_query()


def resolve(session: Session, hf_id: str, revision: str | None, alias: str | None,
            files_cache: FileCache) -> Resolution:
    """``alias`` of (hf_id, revision), or else ``stable``, then ``latest``; NotFound says what exists instead."""
    wanted = (alias,) if alias else DEFAULT_RESOLVE_ALIASES
    params = {"hf_id": hf_id, "revision": revision or "main", "names": list(wanted)}
    rows = session.execute(_CANDIDATES_QUERY, params).mappings().all()
    chosen = next((name for name in wanted if any(r["candidate"] == name for r in rows)), None)
    if chosen is None:
        raise explain_unresolved(session, hf_id, revision, alias)
    mine = [r for r in rows if r["candidate"] == chosen]
    first = mine[0]
    publications = {r["pub_id"]: {c.key: r[f"pub_{c.key}"] for c in _PUBLICATION_COLUMNS}
                    for r in mine if r["pub_id"] is not None}
    return Resolution(
        hf_id=first["hf_id"], revision=first["revision"], alias=chosen,
        filter_set={c.key: first[c.key] for c in _FS_COLUMNS},
        aliases=sorted({r["sibling"] for r in mine if r["sibling"] is not None}),
        publications=[publications[k] for k in sorted(publications)],
        files=_files(session, first["id"], first["sha256"], files_cache),
    )


def _files(session: Session, filter_set_id: int, sha256: str, cache: FileCache) -> tuple[FileRow, ...]:
    key = (filter_set_id, sha256)
    files = cache.get(key)
    if files is None:
        files = tuple(FileRow(name, sha, size) for name, sha, size
                      in session.execute(_FILES_QUERY, {"filter_set_id": filter_set_id}))
        cache.put(key, files)
    return files
