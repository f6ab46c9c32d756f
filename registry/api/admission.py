"""Admission control: at most as many requests inside the app as the database pool has connections.

Without it, a burst larger than the pool deadlocks a sync FastAPI app: the worker threads block waiting for a
connection, while the requests that hold the connections wait for a worker thread to validate their response or run
their next dependency; nothing moves until the pool timeout fails them all. Requests beyond the limit wait here, in
the event loop, before touching a thread or the database, so every admitted request gets a connection at once.
"""

from __future__ import annotations

import anyio
import anyio.to_thread
from starlette.types import ASGIApp, Receive, Scope, Send


class ConcurrencyLimit:
    """Let at most ``limit`` HTTP requests run at once in this process; the rest queue in arrival order."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the concurrency limit must be at least 1, not {limit}")
        self.app, self.limit = app, limit
        self._slots: anyio.Semaphore | None = None  # made in the event loop, on first use

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._slots is None:
            self._slots = anyio.Semaphore(self.limit)
        async with self._slots:
            await self.app(scope, receive, send)


def ensure_worker_threads(admitted: int) -> None:
    """Give the default thread pool at least one thread per admitted request (plus slack), so admission alone
    bounds the wait; call inside the event loop."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = max(limiter.total_tokens, admitted + 8)
