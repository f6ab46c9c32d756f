"""A registry served by uvicorn on a loopback port in a background thread, for tests that talk real HTTP to the
Hub-compatible endpoint with stock huggingface_hub (no test client, no patched client internals)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveRegistry:
    """``url`` serves the app built from ``settings`` until :meth:`stop`; tokens are made through the service."""

    def __init__(self, database_url: str, data_dir: Path, **overrides) -> None:
        from registry.main import create_app
        from registry.migrate import upgrade
        from tests.registry.conftest import make_settings

        upgrade(database_url)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.settings = make_settings(database_url, data_dir, **{"base_url": self.url, **overrides})
        self.app = create_app(self.settings, run_jobs=False)
        self.state = self.app.state.registry
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def token(self, *scopes: str, name: str | None = None) -> str:
        import uuid

        from registry.db import session_scope
        from registry.services import tokens

        with session_scope(self.state.session_factory) as session:
            _row, clear = tokens.create_token(session, name or f"t-{uuid.uuid4().hex[:8]}", list(scopes))
        return clear

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
