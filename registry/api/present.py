"""ORM rows -> API schemas, with links built from the request's base URL (or ``QFILTERS_BASE_URL``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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


def file_ref(filter_set_id: int, name: str, sha256: str, size: int, base: str) -> FileRef:
    return FileRef(name=name, sha256=sha256, size=size, url=f"{base}/v1/filter-sets/{filter_set_id}/files/{name}")


def files_of(fs: FilterSet, base: str) -> list[FileRef]:
    return [file_ref(fs.id, f.name, f.blob_sha256, f.blob.size, base) for f in fs.files]


def filter_set_links(filter_set_id: int, base: str) -> dict[str, str]:
    api = f"{base}/v1/filter-sets/{filter_set_id}"
    return {"self": api, "report_json": f"{api}/report", "report_html": f"{api}/report.html",
            "lineage": f"{api}/lineage", "page": f"{base}/filter-sets/{filter_set_id}/report"}


def _filter_set_fields(columns: Mapping[str, Any], *, model: str, revision: str, aliases: list[str],
                       files: list[FileRef], publications: list[Any], base: str) -> dict[str, Any]:
    """FilterSetPublic's fields from a filter set's columns (an ORM row's or a resolve query's) and its relations."""
    verdict = columns["verdict_detail"] or {}
    return dict(
        id=columns["id"], model_id=columns["model_id"], model=model, revision=revision, version=columns["version"],
        sha256=columns["sha256"], shape=[columns["num_layers"], columns["num_kv_heads"], columns["head_dim"]],
        verdict=columns["verdict"], verdict_reasons=verdict.get("reasons", []),
        verdict_warnings=verdict.get("warnings", []), datasets=columns["dataset_specs"], job_id=columns["job_id"],
        aliases=aliases, created_at=columns["created_at"], files=files, publications=publications,
        links=filter_set_links(columns["id"], base),
    )


def filter_set_public(session: Session, fs: FilterSet, base: str, *, detail: bool = False) -> FilterSetPublic:
    columns = {c.key: getattr(fs, c.key) for c in FilterSet.__table__.columns}
    data = _filter_set_fields(columns, model=fs.model.hf_id, revision=fs.model.revision,
                              aliases=catalog.aliases_of(session, fs), files=files_of(fs, base),
                              publications=list(fs.publications), base=base)
    if detail:
        return FilterSetDetail(**data, provenance=fs.provenance)
    return FilterSetPublic(**data)


def resolved(res: Resolution, base: str) -> Resolved:
    fs_id = res.filter_set["id"]
    files = [file_ref(fs_id, f.name, f.sha256, f.size, base) for f in res.files]
    public = FilterSetPublic(**_filter_set_fields(
        res.filter_set, model=res.hf_id, revision=res.revision, aliases=res.aliases, files=files,
        publications=[PublicationPublic(**p) for p in res.publications], base=base))
    return Resolved(model=res.hf_id, revision=res.revision, alias=res.alias, filter_set=public, files=files,
                    report_url=public.links["report_html"])


def model_public(session: Session, model: BaseModel_) -> ModelPublic:
    columns = {c.key: getattr(model, c.key) for c in BaseModel_.__table__.columns if c.key in ModelPublic.model_fields}
    return ModelPublic(**columns, aliases={a.name: a.filter_set_id for a in model.aliases},
                       versions=catalog.version_count(session, model.id))
