"""Push a publication to its Hub endpoint through ``qfilters.hub.publish``, and record what became of it.

:func:`publish_publication` is the one entry point: the job pipeline's publish step, the in-process runner (for
publications requested over the API) and the Celery workers all call it with a publication id. It claims the row
(``pending`` -> ``publishing``, or a ``publishing`` row whose publisher stopped), rebuilds the filter set's files from
the content-addressed store, pushes them as one commit tagged ``v<version>``, then records ``published`` with the
commit sha, or ``failed`` with the reason.

Crash safety: the upload and the bookkeeping are two steps, and a process can die between them. The publisher is
idempotent (identical content makes no new commit, an existing identical version tag is reused), so running the same
publication again converges on the same single commit and the same single row.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from registry.config import Settings
from registry.db import execute_dml
from registry.models import FilterSet, Job, Publication, utcnow
from registry.security import effective_scopes
from registry.services import audit, catalog

if TYPE_CHECKING:
    from registry.jobspec import JobSpec
from registry.store import ArtifactStore

log = logging.getLogger("qfilters.registry.publish")
SELF = "self"
STALE_AFTER = dt.timedelta(minutes=10)  # a 'publishing' row untouched this long lost its publisher
# Test-only hook: the publishing process kills itself right after the upload when this names the publication id.
CRASH_AFTER_UPLOAD_ENV = "QFILTERS_TEST_CRASH_AFTER_UPLOAD"


@dataclass(frozen=True)
class HubTarget:
    """Where and how publications are pushed (from the service settings)."""

    endpoint: str
    token_file: Path | None
    retries: int = 4
    backoff: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings) -> HubTarget:
        endpoint = settings.hub_endpoint.strip()
        if endpoint == SELF:
            endpoint = settings.base_url  # this registry's Hub-compatible endpoint, reached like any client would
        return cls(endpoint=endpoint.rstrip("/"), token_file=settings.hub_token_file, retries=settings.hub_retries)


@dataclass(frozen=True)
class JobPublication:
    """What a job's publish step asked for: the publication to push, or why there is none."""

    publication_id: int | None
    refused: str | None = None  # the job's token may not publish (any more): the job fails with this reason


def request_for_job(session: Session, job: Job, fs: FilterSet, spec: JobSpec, *, actor: str) -> JobPublication:
    """The publication a job's spec asks for, with the privileges its token has NOW.

    A token revoked or stripped of the publish scope since submission publishes nothing (``refused``: the job must
    say so, not succeed silently); a failing verdict without ``force_publish`` publishes nothing either, as over the
    API. Both are audited as ``actor`` acting on behalf of the job's token. A request this filter set already has
    for the repo is reused, so a step that runs again publishes once.
    """
    from registry.services.jobs import required_scopes

    existing = session.scalar(select(Publication.id).where(Publication.filter_set_id == fs.id,
                                                           Publication.repo_id == spec.publish_to))
    if existing is not None or spec.publish_to is None:
        return JobPublication(existing)
    token, detail = job.token, dict(on_behalf_of=job.token.name, job=job.id)
    if token.revoked_at is not None or not required_scopes(spec) <= effective_scopes(token.scopes):
        why = (f"not published to {spec.publish_to}: token {token.name!r} was revoked or lost the publish scope "
               "after submitting the job")
        audit.record(session, actor, "publication.skip", "filter_set", fs.id, reason=why, **detail)
        return JobPublication(None, refused=why)
    if fs.verdict != "pass" and not spec.force_publish:
        audit.record(session, actor, "publication.skip", "filter_set", fs.id,
                     reason="the filter set failed validation and force_publish is false", **detail)
        return JobPublication(None)
    pub = catalog.request_publication(session, fs, spec.publish_to, actor=actor, force=spec.force_publish, **detail)
    return JobPublication(pub.id)


def publish_publication(factory: sessionmaker[Session], store: ArtifactStore, target: HubTarget,
                        publication_id: int, *, worker: str = "publisher",
                        stale_after: dt.timedelta = STALE_AFTER) -> str:
    """Push one publication; returns its status afterwards (published, failed, or what it already was)."""
    from qfilters.errors import HubError, QFiltersError
    from qfilters.hub import publish, read_token_file

    with factory.begin() as session:
        if not claim(session, publication_id, stale_after):
            pub = session.get(Publication, publication_id)
            return pub.status if pub is not None else "gone"
        pub = session.get(Publication, publication_id)
        assert pub is not None
        fs = session.get(FilterSet, pub.filter_set_id)
        assert fs is not None
        repo_id, tag, base_model = pub.repo_id, f"v{fs.version}", fs.model.hf_id
        pub.tag, pub.endpoint = tag, target.endpoint[:300]
        files = {f.name: f.blob_sha256 for f in fs.files}
        reports = {"report.json": fs.report_json_sha256, "report.html": fs.report_html_sha256,
                   "report.md": fs.report_md_sha256}
    try:
        if not target.endpoint:
            raise HubError("QFILTERS_HUB_ENDPOINT is 'self' but QFILTERS_BASE_URL is empty: set it to this "
                           "registry's public URL so the publisher can reach its Hub endpoint")
        token = read_token_file(target.token_file) if target.token_file else False
        if token is False:
            log.warning("no QFILTERS_HUB_TOKEN_FILE: publishing %s to %s without a token", repo_id, target.endpoint)
        with tempfile.TemporaryDirectory(prefix="qfilters-publish-") as tmp:
            artifact, report = Path(tmp) / "filters", Path(tmp) / "report"
            artifact.mkdir()
            report.mkdir()
            for name, sha in files.items():
                (artifact / name).write_bytes(store.read_bytes(sha))
            for name, sha in reports.items():
                (report / name).write_bytes(store.read_bytes(sha))
            result = publish(artifact, repo_id, report_dir=report, tag=tag, token=token, endpoint=target.endpoint,
                             base_model=base_model, retries=target.retries, backoff=target.backoff)
    except Exception as e:
        if not isinstance(e, (QFiltersError, OSError)):
            log.exception("publication %s to %s failed unexpectedly", publication_id, repo_id)
        reason = f"{type(e).__name__}: {e}"
        if target.token_file is None and getattr(e, "status", None) in (401, 403):
            reason += " (no token was sent: set QFILTERS_HUB_TOKEN_FILE to a file holding the Hub token)"
        with factory.begin() as session:
            _finish(session, publication_id, "failed", detail=reason[:4000], actor=worker)
        log.warning("publication %s to %s failed: %s", publication_id, repo_id, reason)
        return "failed"
    if os.environ.get(CRASH_AFTER_UPLOAD_ENV) == str(publication_id):
        os.kill(os.getpid(), signal.SIGKILL)  # tests only: die between the upload and the bookkeeping
    with factory.begin() as session:
        url = f"{result.repo_url}/tree/{tag}"
        _finish(session, publication_id, "published", actor=worker, commit_sha=result.commit_sha, url=url,
                detail=f"{'committed' if result.created_commit else 'already on the Hub at'} {result.commit_sha} "
                       f"(tag {tag}) on {target.endpoint}")
    return "published"


def claim(session: Session, publication_id: int, stale_after: dt.timedelta) -> bool:
    """Take a pending publication, or one left 'publishing' by a publisher that stopped; one claimer wins."""
    now = utcnow()
    result = execute_dml(
        session,
        update(Publication)
        .where(Publication.id == publication_id,
               or_(Publication.status == "pending",
                   (Publication.status == "publishing") & (Publication.updated_at <= now - stale_after)))
        .values(status="publishing", attempts=Publication.attempts + 1, updated_at=now)
    )
    return result.rowcount == 1


def next_pending(session: Session, stale_after: dt.timedelta = STALE_AFTER) -> int | None:
    """The oldest publication waiting for its push, or left 'publishing' by a publisher that stopped."""
    from sqlalchemy import select

    stale = (Publication.status == "publishing") & (Publication.updated_at <= utcnow() - stale_after)
    return session.scalar(select(Publication.id).where(or_(Publication.status == "pending", stale))
                          .order_by(Publication.id).limit(1))


def _finish(session: Session, publication_id: int, status: str, *, actor: str, detail: str,
            commit_sha: str | None = None, url: str | None = None) -> None:
    pub = session.get(Publication, publication_id)
    if pub is None:
        return
    pub.status, pub.detail, pub.updated_at = status, detail, utcnow()
    if commit_sha:
        pub.commit_sha, pub.url = commit_sha, url
    audit.record(session, actor, f"publication.{status}", "filter_set", pub.filter_set_id, publication=pub.id,
                 repo_id=pub.repo_id, commit=commit_sha, detail=detail[:500])
