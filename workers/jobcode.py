"""What each step of a job does in a worker: calibrate one dataset, validate over the stored runs, publish.

The compute is the library's (``calibrate_dataset``, ``run_validation(calibrated=...)``); rows are written through
:mod:`registry.services` (the same catalogue code as the in-process runner), files reach the content-addressed store
before the rows that reference them, and the row that closes a step commits with whatever the step registered.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from registry.config import Settings
from registry.dispatch import Sender, broker_app
from registry.jobspec import JobSpec
from registry.models import FilterSet, Job, JobTask, Publication
from registry.services import catalog, jobs, steps
from registry.state import ServiceContext

log = logging.getLogger("qfilters.workers")


class StepStopped(Exception):
    """The job was cancelled, or the step taken from this worker, while it ran."""


class ModelCache:
    """Models load once per worker process and are reused across jobs; switching model frees the GPU first."""

    def __init__(self, device: str, dtype: str) -> None:
        self.device, self.dtype = device, dtype
        self.key: tuple[str, str] | None = None
        self.model: Any = None
        self.loads = 0

    def get(self, name: str, revision: str) -> Any:
        from qfilters.models import load_model, resolve_alias

        if self.key != (name, revision):
            self.model, self.key = None, None
            gc.collect()
            _free_cuda_cache()
            embedded = resolve_alias(name) is not None
            self.model = load_model(name, revision=None if embedded else revision, device=self.device,
                                    dtype=self.dtype, allow_local=False)  # never a path on this host
            self.key = (name, revision)
            self.loads += 1
        return self.model


def _free_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class WorkerContext:
    ctx: ServiceContext
    sender: Sender
    models: ModelCache
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        device = os.environ.get("QFILTERS_WORKER_DEVICE") or settings.device
        dtype = os.environ.get("QFILTERS_WORKER_DTYPE") or ("float32" if device == "cpu" else "bfloat16")
        return cls(ServiceContext.from_settings(settings), Sender(broker_app(settings)), ModelCache(device, dtype))

    @property
    def factory(self) -> sessionmaker[Session]:
        return self.ctx.session_factory

    @property
    def default_queue(self) -> str:
        return next(iter(self.ctx.settings.queue_capacities))


class StepHeartbeat:
    """Refreshes the step's heartbeat while it runs; notices a cancel or a lost claim for the next progress check."""

    def __init__(self, w: WorkerContext, step: JobTask) -> None:
        self.w, self.step = w, step
        self.stopped = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-heartbeat", daemon=True)

    def __enter__(self) -> StepHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._done.wait(self.w.ctx.settings.heartbeat_seconds):
            try:
                with self.w.factory() as session:
                    if not steps.progress(session, self.step, self.w.worker_id):
                        self.stopped.set()
            except Exception:  # noqa: BLE001 - the database may be away; the next beat tries again
                log.warning("heartbeat of %s/%s%d failed", self.step.job_id, self.step.kind, self.step.position)


class CalibrationReporter:
    """Library progress events -> throttled step/job rows (tokens, tokens/s, ETA); stops on cancel."""

    def __init__(self, w: WorkerContext, step: JobTask, beat: StepHeartbeat, on_rate: Any = None) -> None:
        self.w, self.step, self.beat, self.on_rate = w, step, beat, on_rate
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, p: Any) -> None:
        if self.beat.stopped.is_set():
            raise StepStopped(self.step.job_id)
        now = time.monotonic()
        if now - self.last < self.w.ctx.settings.progress_seconds and 0 < p.completed < p.total:
            return
        self.last = now
        rate = p.completed / max(now - self.started, 1e-6)
        if self.on_rate is not None and p.completed:
            self.on_rate(rate)
        eta = (p.total - p.completed) / rate if p.completed else None
        try:
            with self.w.factory() as session:
                ok = steps.progress(session, self.step, self.w.worker_id, tokens_done=min(p.completed, p.total),
                                    phase=f"calibrating on {p.label} ({rate:.0f} tokens/s)", eta_seconds=eta)
        except Exception:
            log.warning("progress write failed for job %s", self.step.job_id, exc_info=True)
            return
        if not ok:
            raise StepStopped(self.step.job_id)


def load_job(w: WorkerContext, job_id: str) -> tuple[Job, JobSpec]:
    with w.factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job, JobSpec.of(job)


def calibrate(w: WorkerContext, step: JobTask, beat: StepHeartbeat, on_rate: Any = None) -> list[steps.Message]:
    from qfilters.calibrate import dump_result
    from qfilters.data.spec import parse_spec
    from qfilters.validation.run import calibrate_dataset

    job, spec = load_job(w, step.job_id)
    lm = w.models.get(spec.model, spec.revision)
    with w.factory.begin() as session:
        row = session.get(Job, job.id)
        assert row is not None
        catalog.record_architecture(row.model, lm.info.to_dict(), lm.info.revision)
    dataset = parse_spec(spec.datasets[step.position], allow_local=False)  # Hub or embedded only, re-checked here
    result = calibrate_dataset(lm, dataset, spec.validation_settings(),
                               on_progress=CalibrationReporter(w, step, beat, on_rate))
    sha, _size = w.ctx.store.put_bytes(dump_result(result))  # the file first, then the row that names it
    with w.factory() as session:
        if not steps.done(session, step, w.worker_id, result_sha256=sha, seconds=result.seconds):
            raise StepStopped(step.job_id)
        session.commit()
    with w.factory() as session:
        released = steps.release(session, step.job_id, "validate", job.queue or w.default_queue)
    return [released] if released else []


def validate(w: WorkerContext, step: JobTask, beat: StepHeartbeat) -> list[steps.Message]:
    from qfilters.calibrate import load_result
    from qfilters.data.spec import parse_spec
    from qfilters.validation.render import render_html, render_markdown, report_json
    from qfilters.validation.run import run_validation
    from registry.pipeline import JobCancelled, ProgressReporter

    job, spec = load_job(w, step.job_id)
    lm = w.models.get(spec.model, spec.revision)
    with w.factory() as session:
        runs = session.scalars(select(JobTask).where(JobTask.job_id == job.id, JobTask.kind == "calibrate")
                               .order_by(JobTask.position)).all()
    device = next(lm.model.parameters()).device
    results = []
    for r in runs:  # validate is released only once every calibration is done, and done names its result file
        assert r.result_sha256 is not None
        results.append(load_result(w.ctx.store.read_bytes(r.result_sha256), device))
    reporter = ProgressReporter(w.factory, job.id, steps.POOL, spec)
    reporter.calibrated = {s: spec.tokens for s in spec.datasets}
    started = time.perf_counter()
    try:
        calibration = [parse_spec(s, allow_local=False) for s in spec.datasets]
        evaluation = [parse_spec(s, allow_local=False) for s in spec.eval_datasets]
        run = run_validation(lm, calibration, evaluation, spec.validation_settings(), calibrated=results,
                             on_progress=reporter)
        seconds = time.perf_counter() - started  # compute only: what the pipeline adds is measured against it
    except JobCancelled:
        raise StepStopped(job.id) from None
    report = run.report
    report_files = {"json": report_json(report).encode(), "html": render_html(report).encode(),
                    "md": render_markdown(report).encode()}
    with tempfile.TemporaryDirectory(prefix="qfilters-job-") as tmp:
        artifact_dir = run.filters.save_pretrained(Path(tmp) / "filters")
        with w.factory() as session:
            row = session.get(Job, job.id)
            assert row is not None
            for info in report.calibration_datasets:
                catalog.record_dataset(session, info.spec, sha256=info.sha256, source=info.source,
                                       documents=info.documents, tokens=info.tokens)
            for info in (p.dataset for p in report.perplexity):
                catalog.record_dataset(session, info.spec, sha256=info.sha256, source=info.source)
            catalog.create_filter_set(session, w.ctx.store, row, Path(artifact_dir), report_files, report)
            if not steps.done(session, step, w.worker_id, seconds=seconds):  # commits with the filter set, or not
                session.rollback()
                raise StepStopped(job.id)
            session.commit()
    with w.factory() as session:
        released = steps.release(session, step.job_id, "publish", job.queue or w.default_queue)
    return [released] if released else []


def publish(w: WorkerContext, step: JobTask) -> None:
    """Publication, then the job's end in one transaction with the step's close.

    The push itself runs outside any transaction (it talks to a Hub): a step that runs again after a crash reuses
    the job's publication request, and the publisher converges on the same single commit.
    """
    from registry.services.publish import HubTarget, publish_publication, request_for_job

    job, spec = load_job(w, step.job_id)
    actor, error = "worker:" + w.worker_id, None
    if spec.publish_to:
        with w.factory.begin() as session:
            fs = session.scalar(select(FilterSet).where(FilterSet.job_id == step.job_id))
            assert fs is not None, "validate closed without a filter set"
            row = session.get(Job, job.id)
            assert row is not None
            asked = request_for_job(session, row, fs, spec, actor=actor)
        publication_id, error = asked.publication_id, asked.refused
        if publication_id is not None:
            hub = HubTarget.from_settings(w.ctx.settings)
            if publish_publication(w.factory, w.ctx.store, hub, publication_id, worker=actor) == "failed":
                with w.factory() as session:
                    publication = session.get(Publication, publication_id)
                    assert publication is not None
                    detail = publication.detail
                error = f"publishing to {spec.publish_to} failed: {detail}"
    with w.factory() as session:
        if not steps.done(session, step, w.worker_id):
            session.rollback()
            raise StepStopped(step.job_id)
        jobs.finish(session, step.job_id, steps.POOL, "failed" if error else "succeeded", error=error)  # commits
