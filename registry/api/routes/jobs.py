"""Jobs: submit (idempotent), list, read, cancel, retry."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response

from registry.api.deps import JobViewer, SessionDep, StateDep, Submitter
from registry.api.present import base_url, job_public
from registry.jobspec import JobSpec
from registry.models import ApiToken
from registry.schemas import JobCreate, JobList, JobPublic, JobStatus, Problem
from registry.services import jobs, sources

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
JobId = Annotated[str, Path(pattern="^[0-9a-f]{32}$", description="job id (32 hex digits)")]
# the type FastAPI's ``responses=`` takes (a plain literal infers dict[int, ...], which it refuses)
ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": Problem}, 403: {"model": Problem}, 404: {"model": Problem},
                                          409: {"model": Problem}, 422: {"model": Problem}}
# OpenAPI links: what a client (or a stateful test) can do next with the job a submission returns.
JOB_LINKS = {name: {"operationRef": f"#/paths/~1v1~1jobs~1{{job_id}}{suffix}",
                    "parameters": {"job_id": "$response.body#/id"}}
             for name, suffix in (("GetJob", "/get"), ("CancelJob", "~1cancel/post"), ("RetryJob", "~1retry/post"))}


@router.post("", status_code=201, response_model=JobPublic,
             responses={201: {"links": JOB_LINKS}, 200: {"model": JobPublic, "links": JOB_LINKS}, **ERRORS})
def submit_job(
    body: JobCreate, request: Request, response: Response, session: SessionDep, state: StateDep,
    principal: Submitter,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")] = None,
) -> JobPublic:
    """Queue a calibrate -> validate -> publish job. The same ``Idempotency-Key`` and body return the same job.

    ``publish_to`` and ``force_publish`` need the publish scope (403 otherwise). Models and ``hf:`` datasets must be
    embedded, in the operator's allow-list, or confirmed by the Hub (422 otherwise); local paths are always refused.
    """
    token = session.get(ApiToken, principal.token_id)
    assert token is not None
    job, created = jobs.submit(session, token, body, idempotency_key, max_attempts=state.settings.max_attempts,
                               admit=lambda new: sources.check_job(state.settings, new))
    if created:
        state.dispatcher.route(session, job)
    session.commit()
    if created:
        state.dispatcher.submitted(job.id)  # after the commit: a worker must find the row it is sent for
    base = base_url(request)
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"{base}/v1/jobs/{job.id}"
    return job_public(job, base)


@router.get("", response_model=JobList, responses=ERRORS)
def list_jobs(
    request: Request, session: SessionDep, viewer: JobViewer,
    status: JobStatus | None = None,
    model_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> JobList:
    rows, total = jobs.list_jobs(session, status=status, model_id=model_id, limit=limit, offset=offset,
                                 viewer=viewer)
    base = base_url(request)
    return JobList(items=[job_public(j, base) for j in rows], total=total)


@router.get("/{job_id}", response_model=JobPublic, responses=ERRORS)
def get_job(job_id: JobId, request: Request, session: SessionDep, viewer: JobViewer) -> JobPublic:
    """A job (readable by all with public reads on; otherwise by its submitter and admins only)."""
    return job_public(jobs.get(session, job_id, viewer), base_url(request))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=ERRORS)
def cancel_job(job_id: JobId, request: Request, session: SessionDep, state: StateDep, principal: Submitter,
               viewer: JobViewer) -> JobPublic:
    """Cancel a queued job at once, or ask a running one to stop (within seconds). Only its submitter or an admin."""
    job = jobs.cancel(session, jobs.get_owned(session, job_id, viewer), principal.name)
    session.commit()
    state.dispatcher.cancelled(job.id)
    return job_public(job, base_url(request))


@router.post("/{job_id}/retry", response_model=JobPublic, responses=ERRORS)
def retry_job(job_id: JobId, request: Request, session: SessionDep, state: StateDep, principal: Submitter,
              viewer: JobViewer) -> JobPublic:
    """Queue a failed or cancelled job again, from the start. Only its submitter or an admin, within today's size
    limits."""
    job = jobs.retry(session, jobs.get_owned(session, job_id, viewer), principal.name,
                     admit=lambda old: sources.check_size(state.settings, JobSpec.of(old)))
    session.commit()
    state.dispatcher.submitted(job.id)
    return job_public(job, base_url(request))
