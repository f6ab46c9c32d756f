"""Jobs: idempotent submission, cancel and retry, and the claim / progress / finish protocol runners follow.

The SQL row is the source of truth. A runner (the in-process one of ``qfilters serve`` or a Celery worker) owns a job
only through a conditional update on its status, proves it is alive with a heartbeat on every progress write, and
loses the job to recovery when the heartbeat goes stale.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from registry.db import execute_dml
from registry.errors import Conflict, Forbidden, NotFound
from registry.jobspec import JobSpec, spec_version
from registry.models import ACTIVE_STATUSES, ApiToken, BaseModel_, Dataset, Job, JobDataset, new_id, utcnow
from registry.schemas import JobCreate
from registry.security import effective_scopes
from registry.services import audit
from registry.services.query import page, where_equal
from registry.services.upsert import get_or_create, insert_ignore

DEFAULT_REVISION = "main"


def canonical_request(body: JobCreate) -> dict:
    data = body.model_dump(mode="json")
    data["revision"] = data["revision"] or DEFAULT_REVISION
    # the shape of the lowest spec version that holds the job: a request from before these fields hashes the same
    if not data["passkey_trials"]:
        del data["passkey_trials"], data["passkey_context"]
    if not data["search_recipe"]:
        del data["search_recipe"], data["recipe_docs"]
    return data


def request_hash(request: dict) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hub_id_for(model: str) -> str:
    """Embedded aliases (``smollm2``) are registered under the Hub id of the model they are a copy of."""
    from qfilters.models import EMBEDDED, resolve_alias

    alias = resolve_alias(model)
    return EMBEDDED[alias].hub_id if alias else model


@dataclass(frozen=True)
class Viewer:
    """Who asks about jobs. Jobs belong to the token that submitted them: only it and admins act on a job. Reading
    follows the service's reads: with public reads on, every job is readable (like the catalogue they feed);
    with them off, a non-admin token sees only its own jobs, and others' answer 404 as if they did not exist."""

    token_id: int | None
    admin: bool = False
    public_reads: bool = True

    def sees(self, job: Job) -> bool:
        return self.public_reads or self.owns(job)

    def owns(self, job: Job) -> bool:
        return self.admin or (self.token_id is not None and job.token_id == self.token_id)


def required_scopes(body: JobCreate | JobSpec) -> set[str]:
    """The scopes a job body asks for: submitting, plus publishing when it names a repo, forces a publication, or
    loosens a gate (a passing verdict moves ``latest``, which resolve serves)."""
    from qfilters.validation.gates import loosened_gates

    publishes = body.publish_to is not None or body.force_publish or bool(loosened_gates(body.gates))
    return {"submit"} | ({"publish"} if publishes else set())


def submit(session: Session, token: ApiToken, body: JobCreate, idempotency_key: str | None,
           max_attempts: int = 3, *, admit: Callable[[JobCreate], None] | None = None) -> tuple[Job, bool]:
    """Create a job, or return the one this token already created with the same ``Idempotency-Key``.

    Returns ``(job, created)``. The same key with a different body is a :class:`Conflict`; a body that asks for a
    privilege the token lacks (``publish_to``, ``force_publish``, looser gates) is :class:`Forbidden`. ``admit`` checks
    a new job's sources (models, datasets) before anything is written; it raises to refuse.
    """
    missing = required_scopes(body) - effective_scopes(token.scopes)
    if missing:
        why = ("; publish_to, force_publish and gates looser than the defaults publish the result: drop them or use a "
               "token with the publish scope" if "publish" in missing else "")
        raise Forbidden(f"token {token.name!r} lacks the {' and '.join(sorted(missing))} scope this job needs{why}")
    request = canonical_request(body)
    digest = request_hash(request)
    if idempotency_key is not None:
        existing = _by_key(session, token.id, idempotency_key)
        if existing is not None:
            return _same_request(existing, digest), False
    if admit is not None:
        admit(body)

    model = get_or_create(session, BaseModel_, {"hf_id": hub_id_for(body.model), "revision": request["revision"]})
    job_id = new_id()
    values = dict(id=job_id, token_id=token.id, idempotency_key=idempotency_key, request_hash=digest,
                  request=request, model_id=model.id, status="queued", max_attempts=max_attempts, created_at=utcnow(),
                  tokens_done=0, tokens_total=body.tokens * len(body.datasets), steps_done=0, steps_total=0,
                  fraction=0.0, attempts=0, cancel_requested=False, spec_version=spec_version(request))
    if idempotency_key is None:
        session.add(Job(**values))
        session.flush()
    else:
        insert_ignore(session, Job, values, ["token_id", "idempotency_key"])
        existing = _by_key(session, token.id, idempotency_key)
        assert existing is not None
        if existing.id != job_id:  # a concurrent request with the same key won the insert
            return _same_request(existing, digest), False
    job = session.get(Job, job_id)
    assert job is not None
    for role, specs in (("calibration", body.datasets), ("evaluation", body.eval_datasets)):
        for position, spec in enumerate(specs):
            dataset = get_or_create(session, Dataset, {"spec": spec})
            session.add(JobDataset(job_id=job.id, role=role, position=position, dataset_id=dataset.id))
    audit.record(session, token.name, "job.submit", "job", job.id, model=request["model"],
                 revision=request["revision"], idempotency_key=idempotency_key)
    session.flush()
    return job, True


def owner_name(session: Session, job_id: str) -> str | None:
    """The name of the token that submitted the job (audit entries of runners name it as ``on_behalf_of``)."""
    return session.scalar(select(ApiToken.name).join(Job, Job.token_id == ApiToken.id).where(Job.id == job_id))


def _by_key(session: Session, token_id: int, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.token_id == token_id, Job.idempotency_key == key))


def _same_request(job: Job, digest: str) -> Job:
    if job.request_hash != digest:
        raise Conflict(
            f"Idempotency-Key was already used for job {job.id} with a different request body; "
            "use a new key for a new job, or resend the original body to get that job back"
        )
    return job


def get(session: Session, job_id: str, viewer: Viewer | None = None) -> Job:
    """The job, if ``viewer`` (default: the system) may see it."""
    job = session.get(Job, job_id) if len(job_id) <= 32 else None
    if job is None or (viewer is not None and not viewer.sees(job)):
        raise NotFound(f"no job with id {job_id!r}")
    return job


def get_owned(session: Session, job_id: str, viewer: Viewer) -> Job:
    """The job, for a write: 404 if ``viewer`` cannot see it, 403 if it can but the job is another token's."""
    job = get(session, job_id, viewer)
    if not viewer.owns(job):
        raise Forbidden(f"job {job.id} belongs to token {job.token.name!r}; only it or an admin can change it")
    return job


def list_jobs(session: Session, *, status: str | None = None, model_id: int | None = None, limit: int = 50,
              offset: int = 0, viewer: Viewer | None = None) -> tuple[list[Job], int]:
    query = where_equal(select(Job), (Job.status, status), (Job.model_id, model_id))
    if viewer is not None and not (viewer.public_reads or viewer.admin):
        query = query.where(Job.token_id == (viewer.token_id if viewer.token_id is not None else -1))
    return page(session, query, Job.created_at.desc(), Job.id, limit=limit, offset=offset)


def cancel(session: Session, job: Job, actor: str) -> Job:
    """Queued jobs stop at once; running ones are asked to stop and do so at their next progress write."""
    if job.status == "queued":
        job.status, job.finished_at = "cancelled", utcnow()
    elif job.status in ACTIVE_STATUSES:
        job.cancel_requested = True
    elif job.status != "cancelled":
        raise Conflict(f"job {job.id} has {job.status}; only queued or running jobs can be cancelled")
    audit.record(session, actor, "job.cancel", "job", job.id, status=job.status)
    return job


def retry(session: Session, job: Job, actor: str, admit: Callable[[Job], None] | None = None) -> Job:
    """Queue a failed or cancelled job again; ``admit`` may still refuse it (raising) before anything changes."""
    if job.status not in ("failed", "cancelled"):
        raise Conflict(f"job {job.id} has status {job.status}; only failed or cancelled jobs can be retried")
    if admit is not None:
        admit(job)
    job.status, job.error, job.cancel_requested = "queued", None, False
    job.attempts, job.claimed_by, job.heartbeat_at, job.finished_at = 0, None, None, None
    job.tokens_done = job.steps_done = 0
    job.fraction, job.phase, job.eta_seconds = 0.0, None, None
    audit.record(session, actor, "job.retry", "job", job.id)
    return job


# ------------------------------------------------------------------------------------------------ runner protocol


def claim(session: Session, job_id: str, runner_id: str, *, commit: bool = True) -> Job | None:
    """Own a queued job with a conditional update: of two runners (or two deliveries of one message) one wins.

    Returns the job, or ``None`` if it was not queued (taken, cancelled, gone). The attempt is counted here.
    """
    now = utcnow()
    result = execute_dml(
        session,
        update(Job).where(Job.id == job_id, Job.status == "queued")
        .values(status="running", claimed_by=runner_id, attempts=Job.attempts + 1, started_at=now,
                heartbeat_at=now, phase="starting", error=None)
    )
    if commit:
        session.commit()
    return session.get(Job, job_id, populate_existing=True) if result.rowcount == 1 else None


def claim_next(session: Session, runner_id: str) -> Job | None:
    """Take the oldest queued job; ``None`` if there is none (or others took them all)."""
    for _ in range(5):
        job_id = session.scalar(select(Job.id).where(Job.status == "queued").order_by(Job.created_at, Job.id).limit(1))
        if job_id is None:
            return None
        job = claim(session, job_id, runner_id)
        if job is not None:
            return job
    return None


@dataclass
class ProgressUpdate:
    status: str
    phase: str
    tokens_done: int
    tokens_total: int
    steps_done: int
    steps_total: int
    fraction: float
    eta_seconds: float | None


def heartbeat(session: Session, job_id: str, runner_id: str) -> bool:
    """Prove the runner is alive during long steps that report no progress (a model download, say)."""
    result = execute_dml(session, update(Job).where(Job.id == job_id, Job.claimed_by == runner_id,
                                                    Job.status.in_(ACTIVE_STATUSES)).values(heartbeat_at=utcnow()))
    session.commit()
    return result.rowcount == 1


def write_progress(session: Session, job_id: str, runner_id: str, p: ProgressUpdate) -> bool:
    """Record progress and the heartbeat. Returns False if the runner no longer owns the job or cancel was asked."""
    result = execute_dml(
        session,
        update(Job).where(Job.id == job_id, Job.claimed_by == runner_id, Job.status.in_(ACTIVE_STATUSES))
        .values(status=p.status, phase=p.phase[:200], tokens_done=p.tokens_done, tokens_total=p.tokens_total,
                steps_done=p.steps_done, steps_total=p.steps_total, fraction=p.fraction, eta_seconds=p.eta_seconds,
                heartbeat_at=utcnow())
    )
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    session.commit()
    return result.rowcount == 1 and not cancel


def still_wanted(session: Session, job_id: str, runner_id: str) -> bool:
    """Whether the runner should go on: it still owns the job, the job is active, and nobody asked to cancel it."""
    row = session.execute(select(Job.claimed_by, Job.status, Job.cancel_requested).where(Job.id == job_id)).first()
    session.rollback()  # end the read transaction at once
    return row is not None and row.claimed_by == runner_id and row.status in ACTIVE_STATUSES \
        and not row.cancel_requested


def finish(session: Session, job_id: str, runner_id: str, status: str, *, error: str | None = None) -> bool:
    result = execute_dml(
        session,
        update(Job).where(Job.id == job_id, Job.claimed_by == runner_id, Job.status.in_(ACTIVE_STATUSES))
        .values(status=status, error=error, finished_at=utcnow(), eta_seconds=None, heartbeat_at=utcnow(),
                fraction=1.0 if status == "succeeded" else Job.fraction,
                phase=None if status == "succeeded" else Job.phase)
    )
    if result.rowcount == 1:
        audit.record(session, "runner:" + runner_id, f"job.{status}", "job", job_id, error=error,
                     on_behalf_of=owner_name(session, job_id))
    session.commit()
    return result.rowcount == 1


def recover_stale(session: Session, stale_after: dt.timedelta) -> list[str]:
    """Jobs whose runner stopped (no heartbeat for ``stale_after``): requeue them, or fail them after max attempts."""
    limit = utcnow() - stale_after
    stale = session.scalars(
        select(Job).where(Job.status.in_(ACTIVE_STATUSES), Job.heartbeat_at < limit)
    ).all()
    touched = []
    for job in stale:
        values: dict
        if job.cancel_requested:
            values = dict(status="cancelled", finished_at=utcnow(), error="cancelled while its runner was down")
        elif job.attempts >= job.max_attempts:
            values = dict(status="failed", finished_at=utcnow(),
                          error=f"its runner stopped during attempt {job.attempts} of {job.max_attempts}; "
                                "retry the job to start again")
        else:
            values = dict(status="queued", claimed_by=None, error=None,
                          phase=f"requeued: its runner stopped during attempt {job.attempts}")
        result = execute_dml(
            session,
            update(Job).where(Job.id == job.id, Job.status == job.status, Job.claimed_by == job.claimed_by)
            .values(**values)
        )
        if result.rowcount == 1:
            audit.record(session, "system", "job.recover", "job", job.id, to=values["status"])
            touched.append(job.id)
    session.commit()
    return touched
