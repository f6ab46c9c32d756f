"""The job code path: calibrate -> validate -> register (-> publish request), through qfilters' public API.

The in-process runner of ``qfilters serve`` calls :func:`execute_job`; the Celery workers will call the same function.
It re-reads the job row, reports progress (with the heartbeat), notices a cancel request within about a second of
the library's next progress event (one per calibration batch and per evaluation forward pass), and leaves nothing
half-written: files reach the content-addressed store before the SQL rows that reference them. What the job reads
comes from the Hub or the embedded corpora only, never from paths on this machine (``allow_local=False``).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from registry.jobspec import JobSpec, SpecError
from registry.models import Job, Publication
from registry.services import catalog, jobs
from registry.services.publish import HubTarget, JobPublication, publish_publication, request_for_job
from registry.store import ArtifactStore

log = logging.getLogger("qfilters.registry.pipeline")
CALIBRATION_WEIGHT = 0.6  # shares of a job's progress bar: calibration, evaluation sweeps, then the transfer matrix
EVALUATION_WEIGHT = 0.3


class JobCancelled(Exception):
    """The job was cancelled (or taken away from this runner) while it ran."""


class ProgressReporter:
    """Turns the library's progress events into throttled job-row updates, and notices cancellation.

    The job's ``fraction`` never goes back: calibration fills the first 60 %, the evaluation sweep of each evaluation
    dataset an equal share of the next 30 %, the transfer matrix the last 10 %. Progress rows are written at most
    every ``min_interval`` seconds, but whether to stop is asked at least every ``cancel_interval`` seconds.
    """

    def __init__(self, factory: sessionmaker[Session], job_id: str, runner_id: str, body: JobSpec,
                 min_interval: float = 2.0, cancel_interval: float = 1.0) -> None:
        self.factory, self.job_id, self.runner_id = factory, job_id, runner_id
        self.tokens_total = body.tokens * len(body.datasets)
        self.eval_labels = list(body.eval_datasets)
        self.min_interval, self.cancel_interval = min_interval, cancel_interval
        self.last_check = 0.0
        self.last_edge: tuple[str, str, int] | None = None
        self.calibrated: dict[str, int] = {}
        self.started = time.monotonic()
        self.phase_started: dict[str, float] = {}
        self.fraction = 0.0
        self.last_write = 0.0

    @property
    def tokens_done(self) -> int:
        return sum(self.calibrated.values())

    def status(self, status: str, phase: str) -> None:
        self._write(jobs.ProgressUpdate(status, phase, self.tokens_done, self.tokens_total, 0, 0, self.fraction, None),
                    force=True)

    def __call__(self, p: Any) -> None:  # qfilters.validation.run.Progress
        now = time.monotonic()
        started = self.phase_started.setdefault(f"{p.phase}:{p.label}", now)
        share = min(p.completed / p.total, 1.0) if p.total else 0.0
        if p.phase == "calibrate":
            self.calibrated[p.label] = min(p.completed, p.total)
            done = self.tokens_done
            rate = done / max(now - self.started, 1e-6)
            eta = (self.tokens_total - done) / rate if done else None
            fraction = CALIBRATION_WEIGHT * done / max(self.tokens_total, 1)
            update = jobs.ProgressUpdate("running", f"calibrating on {p.label}", done, self.tokens_total, 0, 0,
                                         fraction, eta)
        else:
            per_step = (now - started) / p.completed if p.completed else None
            eta = per_step * (p.total - p.completed) if per_step is not None else None
            if p.phase == "recipe":
                fraction = CALIBRATION_WEIGHT
                phase = "searching an eviction recipe on calibration text"
            elif p.phase == "passkey":
                fraction = CALIBRATION_WEIGHT + EVALUATION_WEIGHT
                phase = "passkey retrieval under compression"
            elif p.phase == "evaluate":
                index = self.eval_labels.index(p.label) if p.label in self.eval_labels else 0
                fraction = CALIBRATION_WEIGHT + EVALUATION_WEIGHT * (index + share) / max(len(self.eval_labels), 1)
                phase = f"evaluating on {p.label}"
            else:
                fraction = CALIBRATION_WEIGHT + EVALUATION_WEIGHT + (1 - CALIBRATION_WEIGHT - EVALUATION_WEIGHT) * share
                phase = "building the transfer matrix"
            update = jobs.ProgressUpdate("validating", phase, self.tokens_done, self.tokens_total, p.completed,
                                         p.total, fraction, eta)
        self.fraction = update.fraction = max(self.fraction, min(update.fraction, 0.99))
        # the first and last event of a phase are written at once; the library repeats its latest event between
        # layers (a point to stop at), and those repeats only ever go through the throttle
        edge = (p.phase, p.label, p.completed) if p.completed == 0 or p.completed >= p.total else None
        self._write(update, force=edge is not None and edge != self.last_edge)
        self.last_edge = edge or self.last_edge

    def _write(self, update: jobs.ProgressUpdate, force: bool) -> None:
        now = time.monotonic()
        if force or now - self.last_write >= self.min_interval:
            self.last_write = self.last_check = now
            with self.factory() as session:
                if not jobs.write_progress(session, self.job_id, self.runner_id, update):
                    raise JobCancelled(self.job_id)
        elif now - self.last_check >= self.cancel_interval:
            self.last_check = now
            with self.factory() as session:
                if not jobs.still_wanted(session, self.job_id, self.runner_id):
                    raise JobCancelled(self.job_id)


class Heartbeat:
    """A daemon thread that refreshes the job's heartbeat every ``interval`` seconds while the job runs."""

    def __init__(self, factory: sessionmaker[Session], job_id: str, runner_id: str, interval: float = 20.0) -> None:
        self.factory, self.job_id, self.runner_id, self.interval = factory, job_id, runner_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id[:8]}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self.factory() as session:
                    if not jobs.heartbeat(session, self.job_id, self.runner_id):
                        return  # the job ended or was taken from this runner
            except Exception:
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)


class ModelCache:
    """Keeps the last loaded model, so consecutive jobs on the same model skip the load."""

    def __init__(self) -> None:
        self.key: tuple[str, str, str] | None = None
        self.model: Any = None

    def get(self, name: str, revision: str, device: str) -> Any:
        from qfilters.models import load_model, resolve_alias

        key = (name, revision, device)
        if self.key != key:
            self.model = None  # free the previous one first
            embedded = resolve_alias(name) is not None
            self.model = load_model(name, revision=None if embedded else revision, device=device, allow_local=False)
            self.key = key
        return self.model


def execute_job(factory: sessionmaker[Session], store: ArtifactStore, job_id: str, runner_id: str, *,
                device: str = "cpu", models: ModelCache | None = None, hub: HubTarget | None = None) -> str:
    """Run a claimed job to its end; returns the final status (succeeded, failed or cancelled).

    With ``hub``, a requested publication is pushed as the job's last step (its failure fails the job); without,
    it stays ``pending`` for a publisher to pick up."""
    with factory() as session:
        job = session.get(Job, job_id)
        if job is None:  # deleted meanwhile: nothing to do
            return "gone"
        try:  # the stored, versioned spec, not today's request schema; its paths are re-checked when they are read
            body = JobSpec.of(job)
        except SpecError as e:
            jobs.finish(session, job_id, runner_id, "failed", error=str(e))
            return "failed"
    with Heartbeat(factory, job_id, runner_id):
        final, error = _run_steps(factory, store, job_id, runner_id, body, device, models or ModelCache(), hub)
    with factory() as session:
        jobs.finish(session, job_id, runner_id, final, error=error)  # no-op if the job was taken from this runner
    return final


def _run_steps(factory: sessionmaker[Session], store: ArtifactStore, job_id: str, runner_id: str, body: JobSpec,
               device: str, models: ModelCache, hub: HubTarget | None = None) -> tuple[str, str | None]:
    """Load, validate, register, request publication; returns (final status, error)."""
    from qfilters.errors import QFiltersError

    reporter = ProgressReporter(factory, job_id, runner_id, body)
    try:
        reporter.status("running", f"loading model {body.model}")
        lm = models.get(body.model, body.revision or jobs.DEFAULT_REVISION, device)
        with factory.begin() as session:
            job = session.get(Job, job_id)
            assert job is not None
            catalog.record_architecture(job.model, lm.info.to_dict(), lm.info.revision)
        filter_set_id = _validate_and_register(factory, store, job_id, body, lm, reporter)
        if body.publish_to:
            reporter.status("publishing", f"requesting publication to {body.publish_to}")
            asked = _request_publication(factory, job_id, runner_id, filter_set_id, body)
            if asked.refused:
                return "failed", asked.refused
            pub_id = asked.publication_id
            if hub is not None and pub_id is not None:
                reporter.status("publishing", f"publishing to {body.publish_to} on {hub.endpoint}")
                if publish_publication(factory, store, hub, pub_id, worker="runner:" + runner_id) == "failed":
                    with factory() as session:
                        publication = session.get(Publication, pub_id)
                        assert publication is not None
                        detail = publication.detail
                    return "failed", f"publishing to {body.publish_to} failed: {detail}"
        return "succeeded", None
    except JobCancelled:
        return "cancelled", None
    except QFiltersError as e:
        return "failed", f"{type(e).__name__}: {e}"
    except Exception as e:
        log.exception("job %s failed", job_id)
        return "failed", f"internal error ({type(e).__name__}): {e}"


def _request_publication(factory: sessionmaker[Session], job_id: str, runner_id: str, filter_set_id: int,
                         body: JobSpec) -> JobPublication:
    with factory.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        fs = catalog.get_filter_set(session, filter_set_id)
        return request_for_job(session, job, fs, body, actor="runner:" + runner_id)


def _validate_and_register(factory: sessionmaker[Session], store: ArtifactStore, job_id: str, body: JobSpec,
                           lm: Any, reporter: ProgressReporter) -> int:
    from qfilters.data.spec import parse_spec
    from qfilters.validation.render import render_html, render_markdown, report_json
    from qfilters.validation.run import run_validation

    calibration = [parse_spec(spec, allow_local=False) for spec in body.datasets]  # Hub-only, re-checked here
    evaluation = [parse_spec(spec, allow_local=False) for spec in body.eval_datasets]
    run = run_validation(lm, calibration, evaluation, body.validation_settings(), on_progress=reporter)
    reporter.status("validating", "storing filters and report")
    report = run.report
    report_files = {"json": report_json(report).encode(), "html": render_html(report).encode(),
                    "md": render_markdown(report).encode()}
    with tempfile.TemporaryDirectory(prefix="qfilters-job-") as tmp:
        artifact_dir = run.filters.save_pretrained(Path(tmp) / "filters")
        with factory.begin() as session:
            job = session.get(Job, job_id)
            assert job is not None
            for info in run.report.calibration_datasets:
                catalog.record_dataset(session, info.spec, sha256=info.sha256, source=info.source,
                                       documents=info.documents, tokens=info.tokens)
            for info in (p.dataset for p in run.report.perplexity):
                catalog.record_dataset(session, info.spec, sha256=info.sha256, source=info.source)
            fs = catalog.create_filter_set(session, store, job, Path(artifact_dir), report_files, report)
            return fs.id
