"""ORM rows -> API schemas, with links built from the request's base URL (or ``QFILTERS_BASE_URL``)."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy.orm import Session

from registry.models import BaseModel_, FilterSet, Job
from registry.schemas import (
    FileRef,
    FilterSetDetail,
    FilterSetPublic,
    JobProgress,
    JobPublic,
    ModelPublic,
    PublicationPublic,
    Resolved,
)
from registry.services import catalog
from registry.services.resolver import Resolution


def base_url(request: Request) -> str:
    configured = request.app.state.registry.settings.base_url
    return (configured or str(request.base_url)).rstrip("/")


def job_progress(job: Job) -> JobProgress:
    return JobProgress(phase=job.phase, tokens_done=job.tokens_done, tokens_total=job.tokens_total,
                       steps_done=job.steps_done, steps_total=job.steps_total, fraction=round(job.fraction, 4),
                       eta_seconds=None if job.eta_seconds is None else round(job.eta_seconds, 1))


def job_public(job: Job, base: str) -> JobPublic:
    fs = job.filter_set
    links = {"self": f"{base}/v1/jobs/{job.id}", "page": f"{base}/jobs/{job.id}"}
    if fs is not None:
        links["filter_set"] = f"{base}/v1/filter-sets/{fs.id}"
        links["report"] = f"{base}/filter-sets/{fs.id}/report"
    return JobPublic(
        id=job.id, status=job.status, model=job.model.hf_id, revision=job.model.revision, request=job.request,
        progress=job_progress(job), error=job.error, attempts=job.attempts, max_attempts=job.max_attempts,
        cancel_requested=job.cancel_requested, created_by=job.token.name, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at, filter_set_id=fs.id if fs else None, links=links,
    )


def files_of(fs: FilterSet, base: str) -> list[FileRef]:
    return [FileRef(name=f.name, sha256=f.blob_sha256, size=f.blob.size,
                    url=f"{base}/v1/filter-sets/{fs.id}/files/{f.name}") for f in fs.files]


def filter_set_links(filter_set_id: int, base: str) -> dict[str, str]:
    api = f"{base}/v1/filter-sets/{filter_set_id}"
    return {"self": api, "report_json": f"{api}/report", "report_html": f"{api}/report.html",
            "lineage": f"{api}/lineage", "page": f"{base}/filter-sets/{filter_set_id}/report"}


def filter_set_public(session: Session, fs: FilterSet, base: str, *, detail: bool = False) -> FilterSetPublic:
    verdict = fs.verdict_detail or {}
    data = dict(
        id=fs.id, model_id=fs.model_id, model=fs.model.hf_id, revision=fs.model.revision, version=fs.version,
        sha256=fs.sha256, shape=[fs.num_layers, fs.num_kv_heads, fs.head_dim], verdict=fs.verdict,
        verdict_reasons=verdict.get("reasons", []), verdict_warnings=verdict.get("warnings", []),
        datasets=fs.dataset_specs, job_id=fs.job_id, aliases=catalog.aliases_of(session, fs),
        created_at=fs.created_at, files=files_of(fs, base), publications=list(fs.publications),
        links=filter_set_links(fs.id, base),
    )
    if detail:
        return FilterSetDetail(**data, provenance=fs.provenance)
    return FilterSetPublic(**data)


def resolved(res: Resolution, base: str) -> Resolved:
    fs = res.filter_set
    verdict = fs["verdict_detail"] or {}
    files = [FileRef(name=f.name, sha256=f.sha256, size=f.size, url=f"{base}/v1/filter-sets/{fs['id']}/files/{f.name}")
             for f in res.files]
    links = filter_set_links(fs["id"], base)
    public = FilterSetPublic(
        id=fs["id"], model_id=fs["model_id"], model=res.hf_id, revision=res.revision, version=fs["version"],
        sha256=fs["sha256"], shape=[fs["num_layers"], fs["num_kv_heads"], fs["head_dim"]], verdict=fs["verdict"],
        verdict_reasons=verdict.get("reasons", []), verdict_warnings=verdict.get("warnings", []),
        datasets=fs["dataset_specs"], job_id=fs["job_id"], aliases=res.aliases, created_at=fs["created_at"],
        files=files, publications=[PublicationPublic(**p) for p in res.publications], links=links,
    )
    return Resolved(model=res.hf_id, revision=res.revision, alias=res.alias, filter_set=public, files=files,
                    report_url=links["report_html"])


def model_public(session: Session, model: BaseModel_) -> ModelPublic:
    columns = {c.key: getattr(model, c.key) for c in BaseModel_.__table__.columns if c.key in ModelPublic.model_fields}
    return ModelPublic(**columns, aliases={a.name: a.filter_set_id for a in model.aliases},
                       versions=catalog.version_count(session, model.id))
