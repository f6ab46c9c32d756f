"""Server-rendered pages (Jinja2, no SPA, no CDN): models, a model's versions, a job with live progress, reports."""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from registry.api.deps import JobViewer, PublicRead, SessionDep, StateDep
from registry.api.headers import REPORT_CSP
from registry.api.present import job_progress
from registry.api.routes.catalog import cache_headers
from registry.services import catalog, jobs

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(FsPath(__file__).parent / "templates"))
Id = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: SessionDep, viewer: JobViewer) -> Response:
    return models_page(request, session, viewer)


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, session: SessionDep, viewer: JobViewer) -> Response:
    rows, _total = catalog.list_models(session, limit=500)
    items = [(m, catalog.version_count(session, m.id)) for m in rows]
    recent, _total = jobs.list_jobs(session, limit=10, viewer=viewer)
    return templates.TemplateResponse(request, "models.html", {"models": items, "jobs": recent})


@router.get("/models/{model_id}", response_class=HTMLResponse)
def model_page(model_id: Id, request: Request, session: SessionDep, _: PublicRead) -> Response:
    model = catalog.get_model(session, model_id)
    versions, _total = catalog.search_filter_sets(session, model_id=model.id, limit=500)
    aliases = {fs.id: catalog.aliases_of(session, fs) for fs in versions}
    return templates.TemplateResponse(request, "model.html", {"model": model, "versions": versions,
                                                              "aliases": aliases})


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: Annotated[str, Path(pattern="^[0-9a-f]{32}$")], request: Request, session: SessionDep,
             viewer: JobViewer) -> Response:
    job = jobs.get(session, job_id, viewer)
    return templates.TemplateResponse(request, "job.html", {"job": job, "progress": job_progress(job)})


@router.get("/filter-sets/{filter_set_id}/report", response_class=HTMLResponse)
def report_page(filter_set_id: Id, session: SessionDep, state: StateDep, _: PublicRead) -> Response:
    """The validation report's own self-contained page (inline CSS and images), served as is."""
    fs = catalog.get_filter_set(session, filter_set_id)
    return HTMLResponse(state.store.read_bytes(fs.report_html_sha256),
                        headers={"ETag": f'"{fs.report_html_sha256}"', "Content-Security-Policy": REPORT_CSP,
                                 **cache_headers(state.settings, "public, max-age=300")})
