"""Models, datasets, filter sets (versions, files, reports, lineage, publications), aliases and resolve."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from qfilters.artifact_format import ArtifactFileName
from registry.api.deps import Admin, JobViewer, PublicRead, Publisher, SessionDep, StateDep
from registry.api.present import base_url, filter_set_public, job_public, model_public, resolved
from registry.config import Settings
from registry.schemas import (
    AliasMovePublic,
    AliasMoveRequest,
    AliasName,
    AliasPublic,
    AuditEventPublic,
    AuditList,
    DatasetList,
    DatasetPublic,
    FilterSetDetail,
    FilterSetList,
    Lineage,
    ModelList,
    ModelPublic,
    Problem,
    PublicationCreate,
    PublicationPublic,
    RepoId,
    Resolved,
    Revision,
)
from registry.services import audit, catalog, resolver

router = APIRouter(prefix="/v1", tags=["catalog"])
Id = Annotated[int, Path(ge=1, le=2**31 - 1)]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1)]
# the type FastAPI's ``responses=`` takes (a plain literal infers dict[int, ...], which it refuses)
ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": Problem}, 403: {"model": Problem}, 404: {"model": Problem},
                                          409: {"model": Problem}, 422: {"model": Problem}}
FileName = ArtifactFileName  # the format's own list of file names: the library owns it
IMMUTABLE = "public, max-age=31536000, immutable"


def cache_headers(settings: Settings, cache_control: str = IMMUTABLE) -> dict[str, str]:
    """Caching of a read: shared caches may keep it only when reads are public (else a proxy could hand a token's
    answer to a caller without one)."""
    if settings.public_reads:
        return {"Cache-Control": cache_control}
    return {"Cache-Control": cache_control.replace("public", "private"), "Vary": "Authorization"}


# ----------------------------------------------------------------------------------------------------------- models


@router.get("/models", response_model=ModelList, tags=["models"], responses=ERRORS)
def list_models(session: SessionDep, _: PublicRead, hf_id: RepoId | None = None,
                architecture: Annotated[str | None, Query(max_length=64)] = None, limit: Limit = 50,
                offset: Offset = 0) -> ModelList:
    rows, total = catalog.list_models(session, hf_id=hf_id, model_type=architecture, limit=limit, offset=offset)
    return ModelList(items=[model_public(session, m) for m in rows], total=total)


@router.get("/models/{model_id}", response_model=ModelPublic, tags=["models"], responses=ERRORS)
def get_model(model_id: Id, session: SessionDep, _: PublicRead) -> ModelPublic:
    return model_public(session, catalog.get_model(session, model_id))


@router.get("/models/{model_id}/aliases", response_model=list[AliasPublic], tags=["aliases"], responses=ERRORS)
def list_aliases(model_id: Id, session: SessionDep, _: PublicRead) -> list[AliasPublic]:
    model = catalog.get_model(session, model_id)
    return [_alias_public(a) for a in model.aliases]


@router.put("/models/{model_id}/aliases/{name}", response_model=AliasPublic, tags=["aliases"], responses=ERRORS)
def move_alias(model_id: Id, name: Annotated[AliasName, Path()], body: AliasMoveRequest, session: SessionDep,
               principal: Publisher) -> AliasPublic:
    """Point an alias (``stable``, ``latest``, ...) at one version; every move is recorded."""
    catalog.get_model(session, model_id)
    fs = catalog.get_filter_set(session, body.filter_set_id)
    alias = catalog.move_alias(session, model_id, name, fs, actor=principal.name, reason=body.reason,
                               force=body.force)
    session.commit()
    return _alias_public(alias)


@router.get("/models/{model_id}/aliases/{name}/history", response_model=list[AliasMovePublic], tags=["aliases"],
            responses=ERRORS)
def alias_history(model_id: Id, name: Annotated[AliasName, Path()], session: SessionDep,
                  _: PublicRead) -> list[AliasMovePublic]:
    alias = catalog.get_alias(session, model_id, name)
    return [AliasMovePublic.model_validate(m) for m in catalog.alias_history(session, alias)]


def _alias_public(alias) -> AliasPublic:
    return AliasPublic(name=alias.name, filter_set_id=alias.filter_set_id, version=alias.filter_set.version,
                       updated_at=alias.updated_at, updated_by=alias.updated_by)


# --------------------------------------------------------------------------------------------------------- datasets


@router.get("/datasets", response_model=DatasetList, tags=["datasets"], responses=ERRORS)
def list_datasets(session: SessionDep, _: PublicRead, limit: Limit = 50, offset: Offset = 0) -> DatasetList:
    rows, total = catalog.list_datasets(session, limit=limit, offset=offset)
    return DatasetList(items=[DatasetPublic.model_validate(d) for d in rows], total=total)


# ------------------------------------------------------------------------------------------------------ filter sets


@router.get("/filter-sets", response_model=FilterSetList, tags=["filter sets"], responses=ERRORS)
def search_filter_sets(
    request: Request, session: SessionDep, _: PublicRead,
    model: RepoId | None = None, revision: Revision | None = None,
    model_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    architecture: Annotated[str | None, Query(max_length=64, description="model_type, e.g. llama")] = None,
    dataset: Annotated[str | None, Query(max_length=300, description="a calibration dataset spec")] = None,
    verdict: Literal["pass", "fail"] | None = None, limit: Limit = 50, offset: Offset = 0,
) -> FilterSetList:
    rows, total = catalog.search_filter_sets(session, model=model, revision=revision, model_id=model_id,
                                             architecture=architecture, dataset=dataset, verdict=verdict,
                                             limit=limit, offset=offset)
    base = base_url(request)
    return FilterSetList(items=[filter_set_public(session, fs, base) for fs in rows], total=total)


@router.get("/filter-sets/{filter_set_id}", response_model=FilterSetDetail, tags=["filter sets"], responses=ERRORS)
def get_filter_set(filter_set_id: Id, request: Request, session: SessionDep, _: PublicRead) -> FilterSetDetail:
    fs = catalog.get_filter_set(session, filter_set_id)
    return filter_set_public(session, fs, base_url(request), detail=True)  # type: ignore[return-value]


@router.get("/filter-sets/{filter_set_id}/lineage", response_model=Lineage, tags=["filter sets"], responses=ERRORS)
def get_lineage(filter_set_id: Id, request: Request, session: SessionDep, viewer: JobViewer) -> Lineage:
    """Job -> datasets -> filter set -> publications (the job only for those who may read it)."""
    fs = catalog.get_filter_set(session, filter_set_id)
    base = base_url(request)
    parts = catalog.lineage(session, fs)
    job = parts["job"]
    return Lineage(
        filter_set=filter_set_public(session, fs, base),
        job=job_public(job, base) if job is not None and viewer.sees(job) else None,
        calibration_datasets=[DatasetPublic.model_validate(d) for d in parts["calibration"]],
        evaluation_datasets=[DatasetPublic.model_validate(d) for d in parts["evaluation"]],
        publications=[PublicationPublic.model_validate(p) for p in parts["publications"]],
    )


@router.head("/filter-sets/{filter_set_id}/files/{name}", include_in_schema=False)
@router.get("/filter-sets/{filter_set_id}/files/{name}", tags=["filter sets"],
            responses={200: {"content": {"application/octet-stream": {}, "application/json": {}}}, 304: {},
                       **ERRORS})
def download_file(filter_set_id: Id, name: FileName, request: Request, session: SessionDep, state: StateDep,
                  _: PublicRead) -> Response:
    """A file of the artifact (kvpress/Hub layout); the sha256 is the ETag and the content never changes."""
    fs = catalog.get_filter_set(session, filter_set_id)
    f = catalog.file_of(session, fs, name)
    return _blob_response(request, state, f.blob_sha256, f.blob.media_type, filename=name)


@router.head("/filter-sets/{filter_set_id}/report", include_in_schema=False)
@router.get("/filter-sets/{filter_set_id}/report", tags=["reports"],
            responses={200: {"content": {"application/json": {}}}, 304: {}, **ERRORS})
def report_json(filter_set_id: Id, request: Request, session: SessionDep, state: StateDep,
                _: PublicRead) -> Response:
    """The validation report (JSON, schema-versioned), as the validator wrote it."""
    fs = catalog.get_filter_set(session, filter_set_id)
    return _blob_response(request, state, fs.report_json_sha256, "application/json")


@router.head("/filter-sets/{filter_set_id}/report.html", include_in_schema=False)
@router.get("/filter-sets/{filter_set_id}/report.html", tags=["reports"],
            responses={200: {"content": {"text/html": {}}}, 304: {}, **ERRORS})
def report_html(filter_set_id: Id, request: Request, session: SessionDep, state: StateDep,
                _: PublicRead) -> Response:
    """The self-contained HTML report page."""
    fs = catalog.get_filter_set(session, filter_set_id)
    return _blob_response(request, state, fs.report_html_sha256, "text/html; charset=utf-8")


@router.head("/filter-sets/{filter_set_id}/report.md", include_in_schema=False)
@router.get("/filter-sets/{filter_set_id}/report.md", tags=["reports"],
            responses={200: {"content": {"text/markdown": {}}}, 304: {}, **ERRORS})
def report_markdown(filter_set_id: Id, request: Request, session: SessionDep, state: StateDep,
                    _: PublicRead) -> Response:
    """The model-card section of the report (Markdown)."""
    fs = catalog.get_filter_set(session, filter_set_id)
    return _blob_response(request, state, fs.report_md_sha256, "text/markdown; charset=utf-8")


@router.post("/filter-sets/{filter_set_id}/publications", status_code=201, response_model=PublicationPublic,
             tags=["filter sets"], responses=ERRORS)
def request_publication(filter_set_id: Id, body: PublicationCreate, session: SessionDep, state: StateDep,
                        principal: Publisher) -> PublicationPublic:
    """Ask for a filter set to be published to a Hub repo (pushed by the runner or a worker, to
    ``QFILTERS_HUB_ENDPOINT``); a failing verdict answers 409 unless ``force``."""
    from qfilters.hub import default_repo_id

    fs = catalog.get_filter_set(session, filter_set_id)
    repo_id = body.repo_id or default_repo_id(fs.model.hf_id, state.settings.hub_organization)
    pub = catalog.request_publication(session, fs, repo_id, actor=principal.name, force=body.force)
    session.commit()
    return PublicationPublic.model_validate(pub)


def _blob_response(request: Request, state, sha256: str, media_type: str, filename: str | None = None) -> Response:
    etag = f'"{sha256}"'
    headers = {"ETag": etag, **cache_headers(state.settings)}
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(state.store.read_bytes(sha256), media_type=media_type, headers=headers)


# ---------------------------------------------------------------------------------------------------------- resolve


@router.get("/resolve", response_model=Resolved, tags=["resolve"], responses=ERRORS)
def resolve(request: Request, session: SessionDep, state: StateDep, _: PublicRead, model: RepoId,
            revision: Revision | None = None,
            alias: Annotated[AliasName | None, Query(description="default: stable, else latest")] = None) -> Resolved:
    """Which filters for base model X (revision R)? The version the alias points to, with its download location."""
    return resolved(resolver.resolve(session, model, revision, alias, state.resolve_files), base_url(request))


# ------------------------------------------------------------------------------------------------------------ audit


@router.get("/audit", response_model=AuditList, tags=["admin"], responses=ERRORS)
def list_audit(session: SessionDep, _: Admin, action: Annotated[str | None, Query(max_length=64)] = None,
               target_type: Annotated[str | None, Query(max_length=32)] = None,
               target_id: Annotated[str | None, Query(max_length=64)] = None,
               limit: Limit = 100, offset: Offset = 0) -> AuditList:
    rows, total = audit.list_events(session, action=action, target_type=target_type, target_id=target_id,
                                    limit=limit, offset=offset)
    return AuditList(items=[AuditEventPublic.model_validate(r) for r in rows], total=total)
