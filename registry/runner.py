"""The in-process job runner of ``qfilters serve``: one job at a time, in a background thread.

It follows the same protocol as the Celery workers will: claim with a conditional update, heartbeat through progress
writes, recover jobs whose runner stopped (requeue, or fail after ``max_attempts``). On start it also recovers what a
previous life of the server left running.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import uuid

from sqlalchemy.orm import Session, sessionmaker

from registry.pipeline import ModelCache, execute_job
from registry.services import jobs
from registry.services.publish import HubTarget, next_pending, publish_publication
from registry.store import ArtifactStore

log = logging.getLogger("qfilters.registry.runner")


class JobRunner:
    def __init__(self, factory: sessionmaker[Session], store: ArtifactStore, *, device: str = "cpu",
                 poll_seconds: float = 1.0, stale_after: dt.timedelta = dt.timedelta(minutes=2),
                 hub: HubTarget | None = None) -> None:
        self.factory, self.store, self.device, self.hub = factory, store, device, hub
        self.poll_seconds, self.stale_after = poll_seconds, stale_after
        self.runner_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.models = ModelCache()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def recover_on_start(self) -> list[str]:
        """Jobs left running by a server that stopped: nothing else can be running them in the embedded setup."""
        with self.factory() as session:
            return jobs.recover_stale(session, dt.timedelta(seconds=0))

    def start(self, *, recover: bool = True) -> None:
        if recover:
            recovered = self.recover_on_start()
            if recovered:
                log.warning("recovered %d job(s) left running by a previous server: %s", len(recovered), recovered)
        self._thread = threading.Thread(target=self._loop, name="qfilters-job-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self) -> str | None:
        """Claim and run one queued job, else push one pending publication; returns the final status of what it
        ran, or None when there was nothing to do."""
        with self.factory() as session:
            jobs.recover_stale(session, self.stale_after)
            job = jobs.claim_next(session, self.runner_id)
            job_id = job.id if job else None
        if job_id is None:
            return self.publish_once()
        log.info("running job %s", job_id)
        status = execute_job(self.factory, self.store, job_id, self.runner_id, device=self.device, models=self.models,
                             hub=self.hub)
        log.info("job %s %s", job_id, status)
        return status

    def publish_once(self) -> str | None:
        """Push one publication requested over the API (pending); None when there is none or no Hub target."""
        if self.hub is None:
            return None
        with self.factory() as session:
            pub_id = next_pending(session)
        if pub_id is None:
            return None
        return publish_publication(self.factory, self.store, self.hub, pub_id, worker="runner:" + self.runner_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.run_once() is None:
                    self._stop.wait(self.poll_seconds)
            except Exception:
                log.exception("job runner error; retrying in %.0f s", self.poll_seconds)
                self._stop.wait(self.poll_seconds)
