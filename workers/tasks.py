"""The tasks: thin. IDs in; the rows are re-read; a step is claimed in SQL or the message is dropped as stale.

Error policy, the same for every step:

* ``QFiltersError`` (bad input, a model the library refuses) and an unreadable job spec: the job ends ``failed`` at
  once with the reason; never retried.
* database and broker errors: retried with backoff, not counted against the job (the database is not the job's fault);
* anything else (out of memory, a bug, a time limit): the step goes back to the queue with its reason and is retried;
  after ``max_attempts`` attempts the job ends ``failed`` with that reason. A worker killed outright is noticed by
  the sweeper from its stale heartbeat and counted the same way.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from workers.app import app

if TYPE_CHECKING:  # annotations only: the job code is imported by the task that runs it
    from registry.models import JobTask
    from registry.services.steps import Message
    from workers.jobcode import StepHeartbeat, WorkerContext

log = logging.getLogger("qfilters.workers")
_context: Any = None
RETRY_BACKOFF_S = (2, 5, 10, 20, 30)


def context() -> Any:
    """One worker context per process, built on first use (after the pool forked: no shared connections)."""
    global _context
    if _context is None:
        from registry.config import get_settings
        from workers.jobcode import WorkerContext

        _context = WorkerContext.from_settings(get_settings())
    return _context


def _transient() -> tuple[type[BaseException], ...]:
    import kombu.exceptions
    import redis.exceptions
    import sqlalchemy.exc

    return (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError,
            kombu.exceptions.OperationalError, redis.exceptions.ConnectionError, ConnectionError)


def _countdown(retries: int) -> int:
    return RETRY_BACKOFF_S[min(retries, len(RETRY_BACKOFF_S) - 1)]


@app.task(name="qfilters.job.start", bind=True, max_retries=None)
def start(self: Any, job_id: str) -> str:
    """Claim the job for the pool and fan out one calibration per dataset."""
    w = context()
    try:
        with w.factory() as session:
            messages = _steps().start(session, job_id, w.worker_id, w.default_queue)
    except _transient() as e:
        raise self.retry(exc=e, countdown=_countdown(self.request.retries)) from None
    w.sender.send(messages)
    return "started" if messages else "stale"


@app.task(name="qfilters.job.calibrate", bind=True, max_retries=None)
def calibrate(self: Any, job_id: str, position: int) -> str:
    from workers import jobcode

    return _run_step(self, job_id, "calibrate", position, lambda w, step, beat: jobcode.calibrate(
        w, step, beat, on_rate=_metrics().calibration_rate))


@app.task(name="qfilters.job.validate", bind=True, max_retries=None)
def validate(self: Any, job_id: str) -> str:
    from workers import jobcode

    return _run_step(self, job_id, "validate", 0, jobcode.validate)


@app.task(name="qfilters.job.publish", bind=True, max_retries=None)
def publish(self: Any, job_id: str) -> str:
    from workers import jobcode

    def body(w: WorkerContext, step: JobTask, beat: StepHeartbeat) -> list[Message]:
        jobcode.publish(w, step)
        return []  # the last step: nothing to send next

    return _run_step(self, job_id, "publish", 0, body)


@app.task(name="qfilters.sweep", bind=True, ignore_result=True)
def sweep(self: Any) -> int:
    """Periodic (celery beat): send again what a lost broker or a dead worker left behind."""
    from registry.dispatch import sweep_once

    w = context()
    return sweep_once(w.factory, w.sender, w.ctx.settings)


def _steps() -> Any:
    from registry.services import steps

    return steps


def _metrics() -> Any:
    from workers import metrics

    return metrics


def _run_step(task: Any, job_id: str, kind: str, position: int, body: Any) -> str:
    from qfilters.errors import QFiltersError
    from registry.jobspec import SpecError
    from workers.jobcode import StepHeartbeat, StepStopped

    steps, w = _steps(), context()
    try:
        with w.factory() as session:
            step = steps.claim(session, job_id, kind, position, w.worker_id)
    except _transient() as e:
        raise task.retry(exc=e, countdown=_countdown(task.request.retries)) from None
    if step is None:
        log.info("%s %s/%d: nothing to do (already claimed, done or cancelled)", kind, job_id, position)
        return "skipped"
    started, outcome = time.monotonic(), "failed"
    try:
        with StepHeartbeat(w, step) as beat:
            messages = body(w, step, beat)
        w.sender.send(messages)
        outcome = "done"
        return outcome
    except StepStopped:
        outcome = "stopped"
        _quietly(lambda s: _cancel_if_asked(s, step))
        return outcome
    except (QFiltersError, SpecError) as e:
        reason = f"{type(e).__name__}: {e}"
        _quietly(lambda s: steps.fail(s, step, w.worker_id, reason))
        return outcome
    except _transient() as e:
        outcome = "retry"
        log.warning("%s %s/%d: %s; retrying", kind, job_id, position, e)
        raise task.retry(exc=e, countdown=_countdown(task.request.retries)) from None
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        log.exception("%s %s/%d attempt %d failed", kind, job_id, position, step.attempts)
        with w.factory() as session:
            job_max = _max_attempts(session, job_id)
            if step.attempts >= job_max:
                steps.fail(session, step, w.worker_id, f"failed {step.attempts} times, last: {reason}")
                return outcome
            steps.give_back(session, step, w.worker_id, reason)
        outcome = "retry"
        raise task.retry(exc=e, countdown=_countdown(task.request.retries)) from None
    finally:
        _metrics().task_finished(kind, outcome, time.monotonic() - started)


def _max_attempts(session: Any, job_id: str) -> int:
    from registry.models import Job

    job = session.get(Job, job_id)
    return job.max_attempts if job else 1


def _cancel_if_asked(session: Any, step: Any) -> None:
    from registry.models import Job

    job = session.get(Job, step.job_id)
    if job is not None and job.cancel_requested:
        _steps().cancel_step(session, step)


def _quietly(fn: Any) -> None:
    """Write a final state; if the database is away, the sweeper finds the step by its stale heartbeat instead."""
    try:
        with context().factory() as session:
            fn(session)
    except Exception:
        log.warning("could not record the end of a step; the sweeper will recover it", exc_info=True)


def _on_process_init(**_: Any) -> None:
    from registry.config import get_settings

    _metrics().serve(get_settings().metrics_port)


try:
    from celery.signals import worker_process_init

    worker_process_init.connect(_on_process_init, weak=False)
except ImportError:  # pragma: no cover - celery is a dependency of this module anyway
    pass
