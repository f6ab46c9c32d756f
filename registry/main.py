"""The ASGI app: ``uvicorn registry.main:app`` in production, ``qfilters serve`` for the embedded default."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request

import registry
from registry import metrics, pages
from registry.api import problems
from registry.api.admission import ConcurrencyLimit, ensure_worker_threads
from registry.api.headers import SecurityHeaders
from registry.api.routes import catalog, hub, jobs
from registry.config import Settings, get_settings
from registry.dispatch import make_dispatcher
from registry.errors import Unprocessable
from registry.state import RegistryState

log = logging.getLogger("qfilters.registry")


def create_app(settings: Settings | None = None, *, run_jobs: bool | None = None, migrate: bool = False) -> FastAPI:
    """Build the app. ``run_jobs`` starts the executor's in-process part (the inline runner, or the worker pool's
    sweeper); ``migrate`` upgrades the database schema first."""
    settings = settings or get_settings()
    state = RegistryState.from_settings(settings)
    state.dispatcher = make_dispatcher(state)
    admitted = settings.db_pool_size + settings.db_max_overflow  # one connection per request inside the app

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ensure_worker_threads(admitted)
        if migrate:
            from registry.migrate import upgrade

            upgrade(settings.database_url)
        started = run_jobs if run_jobs is not None else settings.run_jobs
        if started:  # the inline runner's thread, or the worker pool's sweeper
            state.dispatcher.start()
        yield
        if started:
            state.dispatcher.stop()
        state.engine.dispose()

    app = FastAPI(
        title="qfilters registry",
        version=registry.__version__,
        summary="Calibrate, validate and find Q-Filters for any transformers causal LM.",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url=None,  # served below from the installed swagger-ui-bundle: no CDN, works offline
        redoc_url=None,
        dependencies=[Depends(refuse_nul)],
    )
    app.state.registry = state
    problems.install(app)
    app.add_middleware(ConcurrencyLimit, limit=admitted)
    # outermost: refuse early; only (authenticated) commits to the Hub endpoint may carry whole files
    app.add_middleware(problems.BodySizeLimit, max_bytes=settings.max_request_bytes,
                       overrides={hub.COMMIT_PATH: settings.hub_max_commit_bytes})
    app.include_router(jobs.router)
    app.include_router(catalog.router)
    app.include_router(pages.router)
    app.include_router(metrics.router)
    hub.install(app)  # the Hub-compatible endpoint (/api/..., /{repo}/resolve/...)
    _mount_api_docs(app)
    app.add_middleware(SecurityHeaders)  # outermost: every answer carries them, early refusals included
    return app


def refuse_nul(request: Request) -> None:
    """No identifier, spec or filter can hold a NUL (PostgreSQL text cannot either): refuse it before any query."""
    if "\x00" in request.url.path or any("\x00" in k or "\x00" in v for k, v in request.query_params.multi_items()):
        raise Unprocessable("NUL characters are not allowed in paths or query parameters")


def _mount_api_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from local files (FastAPI's default loads it from a CDN, which closed networks lack)."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    app.mount("/static/swagger", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger")

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="qfilters registry API",
                                   swagger_js_url="/static/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger/swagger-ui.css",
                                   swagger_favicon_url="/static/swagger/favicon-32x32.png")


def __getattr__(name: str) -> FastAPI:
    # ``uvicorn registry.main:app`` builds the app from the environment on first access, not at import time.
    if name == "app":
        built = create_app(run_jobs=False)
        globals()["app"] = built
        return built
    raise AttributeError(name)
