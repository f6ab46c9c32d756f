"""The worker pool's protocol in SQL: a job fans out into steps (calibrate each dataset, validate, publish).

Every step is owned only through a conditional update, like a job: a message delivered twice, or redelivered after a
crash, finds its step already claimed or done and computes nothing (it is counted in ``duplicates``). Attempts are
counted in SQL at each claim, so a step that kills its worker every time ends the job ``failed`` after
``max_attempts`` with the reason, instead of looping. Messages are only ever sent after the rows that need them are
committed; the sweeper sends again what a lost broker or a dead worker left behind.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from sqlalchemy import Float, and_, case, cast, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session

from registry.db import execute_dml
from registry.models import ACTIVE_STATUSES, Job, JobTask, utcnow
from registry.services import audit, jobs

CALIBRATION_WEIGHT = 0.6  # calibration's share of a job's progress bar (as in registry.pipeline)
POOL = "pool"  # Job.claimed_by of jobs run by the worker pool (their steps carry the real worker ids)
KINDS = ("calibrate", "validate", "publish")
TASK_NAMES = {"start": "qfilters.job.start", "calibrate": "qfilters.job.calibrate",
              "validate": "qfilters.job.validate", "publish": "qfilters.job.publish"}


@dataclass(frozen=True)
class Message:
    """A task to send by name once the transaction that made it necessary has committed."""

    name: str
    args: tuple
    queue: str
    task_id: str


def _task_id(job_id: str, kind: str, position: int) -> str:
    return f"{job_id}-{kind}{position}-{uuid.uuid4().hex[:8]}"


def start_message(job: Job, default_queue: str) -> Message:
    # One id per job: the sweeper finds it in the broker, and it is never revoked (a cancelled queued job simply
    # has nothing left to claim), so a retried job can reuse it.
    return Message(TASK_NAMES["start"], (job.id,), job.queue or default_queue, f"{job.id}-start")


def mark_enqueued(session: Session, job_ids: list[str]) -> None:
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids), Job.status == "queued").values(enqueued_at=utcnow()))


def start(session: Session, job_id: str, worker_id: str, default_queue: str) -> list[Message]:
    """Claim a queued job for the pool and plan its steps in the same transaction; the calibrations to send."""
    job = jobs.claim(session, job_id, POOL, commit=False)
    if job is None:
        session.rollback()
        return []
    now = utcnow()
    session.execute(delete(JobTask).where(JobTask.job_id == job_id))  # a retried job starts from scratch
    specs = list(job.request["datasets"])
    queue = job.queue or default_queue
    messages = []
    for position, spec in enumerate(specs):
        message = Message(TASK_NAMES["calibrate"], (job_id, position), queue, _task_id(job_id, "calibrate", position))
        session.add(_step(job_id, "calibrate", position, spec, "queued", now, message.task_id,
                          tokens_total=int(job.request["tokens"])))
        messages.append(message)
    session.add(_step(job_id, "validate", 0, None, "waiting", None, None))
    session.add(_step(job_id, "publish", 0, None, "waiting", None, None))
    session.execute(update(Job).where(Job.id == job_id).values(phase=f"calibrating {len(specs)} datasets",
                                                               claimed_by=POOL))
    audit.record(session, "worker:" + worker_id, "job.start", "job", job_id, steps=len(specs) + 2)
    session.commit()
    return messages


def _step(job_id: str, kind: str, position: int, spec: str | None, status: str, sent: dt.datetime | None,
          task_id: str | None, tokens_total: int = 0) -> JobTask:
    return JobTask(job_id=job_id, kind=kind, position=position, spec=spec, status=status, attempts=0, duplicates=0,
                   sent_at=sent, task_id=task_id, tokens_done=0, tokens_total=tokens_total)


def _key(job_id: str, kind: str, position: int):
    return and_(JobTask.job_id == job_id, JobTask.kind == kind, JobTask.position == position)


def claim(session: Session, job_id: str, kind: str, position: int, worker_id: str) -> JobTask | None:
    """Own a queued step (or take back one this very worker owned, on a retry); ``None`` if the message is stale.

    A step whose job ended or was asked to stop is closed instead; a duplicate message is counted.
    """
    job = session.get(Job, job_id)
    if job is None:
        return None
    if job.status not in ACTIVE_STATUSES or job.cancel_requested:
        session.execute(update(JobTask).where(_key(job_id, kind, position), JobTask.status.in_(("done", "failed")))
                        .values(duplicates=JobTask.duplicates + 1))  # a late copy of a message already served
        session.execute(update(JobTask).where(_key(job_id, kind, position), JobTask.status.in_(("queued", "waiting")))
                        .values(status="cancelled", finished_at=utcnow()))
        if job.cancel_requested and job.status in ACTIVE_STATUSES:
            jobs.finish(session, job_id, POOL, "cancelled")
        session.commit()
        return None
    now = utcnow()
    result = execute_dml(
        session,
        update(JobTask).where(_key(job_id, kind, position),
                              or_(JobTask.status == "queued",
                                  and_(JobTask.status == "running", JobTask.claimed_by == worker_id)))
        .values(status="running", claimed_by=worker_id, attempts=JobTask.attempts + 1, started_at=now,
                heartbeat_at=now, error=None)
    )
    if result.rowcount != 1:
        session.execute(update(JobTask).where(_key(job_id, kind, position))
                        .values(duplicates=JobTask.duplicates + 1))
        session.commit()
        return None
    step = session.scalar(select(JobTask).where(_key(job_id, kind, position)))
    assert step is not None
    if step.attempts > job.max_attempts:  # poison: it was redelivered after every attempt died
        fail(session, step, worker_id, f"gave up after {job.max_attempts} attempts: {step.error or 'worker lost'}")
        return None
    status = {"calibrate": "running", "validate": "validating", "publish": "publishing"}[kind]
    session.execute(update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES))
                    .values(status=status, heartbeat_at=now))
    session.commit()
    return step


def progress(session: Session, step: JobTask, worker_id: str, *, tokens_done: int | None = None,
             phase: str | None = None, steps_done: int = 0, steps_total: int = 0,
             fraction: float | None = None, eta_seconds: float | None = None) -> bool:
    """Record a step's progress and heartbeat, and the job's totals; False if the step was taken or cancel asked."""
    now = utcnow()
    values: dict = {"heartbeat_at": now}
    if tokens_done is not None:
        values["tokens_done"] = tokens_done
    owned = execute_dml(session, update(JobTask).where(_key(step.job_id, step.kind, step.position),
                                                       JobTask.claimed_by == worker_id, JobTask.status == "running")
                                 .values(**values)).rowcount == 1
    job_values: dict = {"heartbeat_at": now}
    if tokens_done is not None:  # the job's totals are the sum over its calibrations, whichever worker runs them
        done = select(func.coalesce(func.sum(JobTask.tokens_done), 0)).where(
            JobTask.job_id == step.job_id, JobTask.kind == "calibrate").scalar_subquery()
        share = CALIBRATION_WEIGHT * cast(done, Float) / func.coalesce(func.nullif(Job.tokens_total, 0), 1)
        job_values.update(tokens_done=done, fraction=case((Job.fraction < share, share), else_=Job.fraction))
    if phase is not None:
        job_values.update(phase=phase[:200], steps_done=steps_done, steps_total=steps_total, eta_seconds=eta_seconds)
    if fraction is not None:  # the job's progress bar never goes back, whichever step reports
        job_values["fraction"] = case((Job.fraction < fraction, min(fraction, 0.99)), else_=Job.fraction)
    session.execute(update(Job).where(Job.id == step.job_id, Job.status.in_(ACTIVE_STATUSES)).values(**job_values))
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == step.job_id))
    session.commit()
    return owned and not cancel


def done(session: Session, step: JobTask, worker_id: str, *, result_sha256: str | None = None,
         seconds: float | None = None) -> bool:
    """Close an owned step (in the caller's transaction, with whatever it registers); False if no longer owned."""
    result = execute_dml(
        session,
        update(JobTask).where(_key(step.job_id, step.kind, step.position), JobTask.claimed_by == worker_id,
                              JobTask.status == "running")
        .values(status="done", finished_at=utcnow(), heartbeat_at=utcnow(), result_sha256=result_sha256,
                seconds=seconds, tokens_done=JobTask.tokens_total if step.kind == "calibrate" else 0)
    )
    return result.rowcount == 1


def release(session: Session, job_id: str, kind: str, queue: str) -> Message | None:
    """Queue ``kind`` once every earlier step is done; only one caller wins. Run in its own transaction, after the
    one that closed the previous step committed, so that the last of concurrent finishers sees them all."""
    earlier = KINDS[: KINDS.index(kind)]
    pending = exists().where(JobTask.job_id == job_id, JobTask.kind.in_(earlier), JobTask.status != "done")
    task_id = _task_id(job_id, kind, 0)
    moved = execute_dml(session, update(JobTask).where(_key(job_id, kind, 0), JobTask.status == "waiting", ~pending)
                                 .values(status="queued", sent_at=utcnow(), task_id=task_id)).rowcount == 1
    session.commit()
    return Message(TASK_NAMES[kind], (job_id,), queue, task_id) if moved else None


def give_back(session: Session, step: JobTask, worker_id: str, error: str) -> bool:
    """A failed attempt that may succeed later (database, broker, out of memory): back to queued, reason kept."""
    result = execute_dml(session, update(JobTask).where(_key(step.job_id, step.kind, step.position),
                                                        JobTask.claimed_by == worker_id, JobTask.status == "running")
                                  .values(status="queued", claimed_by=None, error=error[:2000], sent_at=utcnow()))
    session.commit()
    return result.rowcount == 1


def fail(session: Session, step: JobTask, worker_id: str, error: str) -> None:
    """The step cannot succeed (bad input, model refused, attempts exhausted): it and its job end failed."""
    session.execute(update(JobTask).where(_key(step.job_id, step.kind, step.position))
                    .values(status="failed", finished_at=utcnow(), error=error[:2000]))
    session.execute(update(JobTask).where(JobTask.job_id == step.job_id, JobTask.status.in_(("waiting", "queued")))
                    .values(status="cancelled", finished_at=utcnow()))
    jobs.finish(session, step.job_id, POOL, "failed", error=f"{step.kind} {step.spec or ''}".rstrip() + ": " + error)
    session.commit()


def cancel_step(session: Session, step: JobTask) -> None:
    session.execute(update(JobTask).where(_key(step.job_id, step.kind, step.position))
                    .values(status="cancelled", finished_at=utcnow()))
    session.execute(update(JobTask).where(JobTask.job_id == step.job_id, JobTask.status.in_(("waiting", "queued")))
                    .values(status="cancelled", finished_at=utcnow()))
    jobs.finish(session, step.job_id, POOL, "cancelled")
    session.commit()


def queued_task_ids(session: Session, job_id: str) -> list[str]:
    return [t for t in session.scalars(select(JobTask.task_id).where(JobTask.job_id == job_id,
                                                                     JobTask.status == "queued")) if t]


def sweep(session: Session, *, requeue_after: dt.timedelta, stale_after: dt.timedelta, default_queue: str,
          in_broker: set[str] | None = None) -> list[Message]:
    """What a lost broker or a dead worker left behind, to send again; never touches a step whose worker is alive.

    * jobs still ``queued`` whose start message went out long ago (or never) and is not in the broker: start again;
    * steps ``queued`` whose message went out long ago and is not in the broker: send again. ``in_broker`` holds the
      ids of the messages the broker still has (waiting or delivered, not acknowledged); ``None`` when it cannot be
      read, and then age alone decides (a duplicate only costs a skipped claim);
    * steps ``running`` without heartbeat: their worker died (kill, OOM, host lost): queued again, attempt counted at
      the next claim, or the job fails once ``max_attempts`` attempts died;
    * a next step ``waiting`` although everything before it is done (its releaser died): released.
    """
    now = utcnow()
    messages: list[Message] = []
    # a job just committed has no enqueued_at yet: its request is sending it now, so its age counts from creation
    lost_jobs = session.scalars(select(Job).where(
        Job.status == "queued", func.coalesce(Job.enqueued_at, Job.created_at) < now - requeue_after)).all()
    lost_jobs = [j for j in lost_jobs if in_broker is None or f"{j.id}-start" not in in_broker]
    for job in lost_jobs:
        messages.append(start_message(job, default_queue))
    mark_enqueued(session, [j.id for j in lost_jobs])
    stale = session.execute(
        select(JobTask, Job).join(Job, Job.id == JobTask.job_id).where(or_(
            and_(JobTask.status == "queued", or_(JobTask.sent_at.is_(None), JobTask.sent_at < now - requeue_after)),
            and_(JobTask.status == "running", JobTask.heartbeat_at < now - stale_after)))).all()
    for step, job in stale:
        if job.status not in ACTIVE_STATUSES:
            continue
        if step.status == "queued" and in_broker is not None and step.task_id in in_broker:
            continue  # waiting its turn behind a busy pool, not lost
        if step.status == "running":
            if step.attempts >= job.max_attempts:
                fail(session, step, "sweeper", f"its worker died during attempt {step.attempts} of {job.max_attempts}"
                     " (killed or out of memory each time); retry the job once the cause is fixed")
                continue
            audit.record(session, "system", "job.step.recover", "job", job.id, step=f"{step.kind}{step.position}",
                         attempt=step.attempts)
        task_id = _task_id(job.id, step.kind, step.position)
        moved = execute_dml(
            session,
            update(JobTask).where(_key(job.id, step.kind, step.position), JobTask.status == step.status,
                                  JobTask.claimed_by.is_(step.claimed_by) if step.claimed_by is None
                                  else JobTask.claimed_by == step.claimed_by)
            .values(status="queued", claimed_by=None, sent_at=now, task_id=task_id,
                    error=step.error or ("worker lost" if step.status == "running" else None))).rowcount == 1
        if moved:
            args = (job.id, step.position) if step.kind == "calibrate" else (job.id,)
            messages.append(Message(TASK_NAMES[step.kind], args, job.queue or default_queue, task_id))
    session.commit()
    for job_id, kind in session.execute(
            select(JobTask.job_id, JobTask.kind).join(Job, Job.id == JobTask.job_id)
            .where(JobTask.status == "waiting", Job.status.in_(ACTIVE_STATUSES))).all():
        owner = session.get(Job, job_id)
        released = release(session, job_id, kind, (owner.queue if owner else None) or default_queue)
        if released is not None:
            messages.append(released)
    return messages
