"""RFC 9457 problem details for every error, and a request size limit; bad input never becomes an HTTP 500."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.errors import RegistryError

log = logging.getLogger("qfilters.registry.api")
PROBLEM_JSON = "application/problem+json"


def problem(status: int, title: str, detail: str, instance: str | None = None, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if instance:
        body["instance"] = instance
    body.update({k: v for k, v in extra.items() if v is not None})
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def install(app: FastAPI) -> None:
    _document_problems(app)

    @app.exception_handler(RegistryError)
    async def registry_error(request: Request, exc: RegistryError) -> JSONResponse:
        return problem(exc.status, exc.title, exc.detail, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": _location(tuple(e.get("loc", ()))), "msg": str(e.get("msg", "")), "type": e.get("type")}
                  for e in exc.errors()]
        detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:5]) or "the request is not valid"
        return problem(422, "Invalid request", detail, request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {400: "Bad request", 404: "Not found", 405: "Method not allowed", 413: "Request too large",
                  401: "Unauthorized"}
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such resource {request.url.path}; the API lives under /v1 (see /docs)"
        response = problem(exc.status_code, titles.get(exc.status_code, "Error"), detail, request.url.path)
        response.headers.update(exc.headers or {})  # e.g. the Allow header of a 405
        return response

    @app.exception_handler(OperationalError)
    @app.exception_handler(SQLAlchemyTimeoutError)
    async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # The database refused or dropped a connection, or the pool had none free in time: the request itself was
        # fine, so say 503 and when to come back rather than 500.
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                    str(exc).splitlines()[0][:300])
        response = problem(503, "Service unavailable", "the database is unavailable or saturated right now; "
                           "retry in a few seconds", request.url.path)
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "Internal error", "the server failed to handle this request; it has been logged",
                       request.url.path)


def _document_problems(app: FastAPI) -> None:
    """Make the OpenAPI spec say what the handlers above send: errors declared with ``{"model": Problem}`` are
    ``application/problem+json`` (FastAPI files every response model under ``application/json``), any operation may
    answer 503 (database unavailable), and operations with a request body may answer 400 (FastAPI cannot decode it)
    or 413 (:class:`BodySizeLimit`)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = build()
        problem_ref = "#/components/schemas/Problem"
        problem_body = {PROBLEM_JSON: {"schema": {"$ref": problem_ref}}}
        for operation in (op for ops in spec.get("paths", {}).values() for op in ops.values()):
            responses = operation.get("responses", {})
            for status, response in responses.items():
                content = response.get("content", {})
                declared = content.get("application/json", {}).get("schema", {}).get("$ref")
                if status[:1] in "45" and declared == problem_ref:
                    content[PROBLEM_JSON] = content.pop("application/json")
            extra = [("503", "Service Unavailable: the database is down or saturated (see Retry-After)")]
            if "requestBody" in operation:
                extra += [("400", "Bad Request: the body could not be read (e.g. not UTF-8)"),
                          ("413", "Request Entity Too Large")]
            for status, description in extra:
                responses.setdefault(status, {"description": description, "content": dict(problem_body)})
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length and while streaming (chunked bodies).

    The body is read here, before the app runs, and replayed to it: FastAPI turns any error raised while it reads a
    body into a 400, so an oversized chunked body has to be caught before FastAPI starts reading. At most
    ``max_bytes`` are held in memory.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, overrides: dict[str, int] | None = None) -> None:
        self.app, self.max_bytes = app, max_bytes
        # a path regex (matched whole) -> its own limit, granted only to requests that carry an Authorization
        # header: anonymous callers never make the server buffer more than ``max_bytes``
        self.overrides = [(re.compile(pattern), limit) for pattern, limit in (overrides or {}).items()]

    def limit_for(self, path: str, *, authorized: bool = False) -> int:
        if not authorized:
            return self.max_bytes
        return next((limit for pattern, limit in self.overrides if pattern.fullmatch(path)), self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        max_bytes = self.limit_for(scope.get("path", ""), authorized=bool(headers.get(b"authorization", b"").strip()))
        declared = headers.get(b"content-length")
        if declared is not None and not declared.isdigit():
            await problem(400, "Bad request", "Content-Length must be a decimal number of bytes",
                          scope.get("path"))(scope, receive, send)
            return
        if declared is not None and int(declared) > max_bytes:
            await self._refuse(scope, receive, send, max_bytes)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > max_bytes:
                await self._refuse(scope, receive, send, max_bytes)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnect notices, for streaming responses
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, max_bytes: int) -> None:
        response = problem(413, "Request too large", f"request bodies are limited to {max_bytes} bytes",
                           scope.get("path"))
        await response(scope, receive, send)
