"""The one seam between the API and whoever runs jobs: ``QFILTERS_EXECUTOR=inline`` or ``celery``.

* inline (the embedded default): the in-process runner of ``qfilters serve`` polls the jobs table, as before;
* celery: the API sends tasks **by name** through a bare Celery app that imports no task code (so neither torch nor
  the library's compute paths ever load in the API process), only after the job row is committed, and a sweeper
  thread sends again whatever a lost broker or a dead worker left behind (:func:`registry.services.steps.sweep`);
  a crash between commit and send loses nothing, the sweeper sends it.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from registry.config import Settings
from registry.models import Job
from registry.services import steps

log = logging.getLogger("qfilters.registry.dispatch")


class Dispatcher(Protocol):
    def route(self, session: Session, job: Job) -> None:
        """Before the job's commit: decide where it will run (may refuse it)."""

    def submitted(self, job_id: str) -> None:
        """After the job's commit: make sure it will run."""

    def cancelled(self, job_id: str) -> None:
        """After a cancel's commit: withdraw what was queued for it."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class InlineDispatcher:
    """Today's runner: one job at a time in a thread of this process; it finds queued jobs by itself."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def route(self, session: Session, job: Job) -> None:
        pass

    def submitted(self, job_id: str) -> None:
        pass

    def cancelled(self, job_id: str) -> None:
        pass

    def start(self) -> None:
        from registry.runner import JobRunner
        from registry.services.publish import HubTarget

        settings = self.state.settings
        self.state.runner = JobRunner(self.state.session_factory, self.state.store, device=settings.device,
                                      poll_seconds=settings.runner_poll_seconds, hub=HubTarget.from_settings(settings))
        self.state.runner.start()

    def stop(self) -> None:
        if self.state.runner is not None:
            self.state.runner.stop()


def broker_app(settings: Settings, name: str = "qfilters-api") -> Any:
    """A Celery app with the broker settings only: enough to send tasks by name, nothing to import."""
    from celery import Celery

    app = Celery(name, broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        broker_transport_options={"visibility_timeout": int(settings.task_soft_time_limit + 600)},
        task_default_queue=next(iter(settings.queue_capacities)),
    )
    return app


class Sender:
    """Sends :class:`steps.Message` by name; a broker that is down costs a log line, the sweeper sends again."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def send(self, messages: list[steps.Message]) -> list[steps.Message]:
        sent = []
        for m in messages:
            try:
                self.app.send_task(m.name, args=m.args, queue=m.queue, task_id=m.task_id, retry=True,
                                   retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
                sent.append(m)
            except Exception as e:  # noqa: BLE001 - kombu raises many kinds; the row stays for the sweeper
                log.warning("could not send %s%s (%s: %s); the sweeper will send it again", m.name, m.args,
                            type(e).__name__, e)
        return sent


def messages_in_broker(broker_url: str, queues: list[str]) -> set[str] | None:
    """Ids of the task messages a Redis broker still holds (queued, or delivered and not yet acknowledged).

    ``None`` if the broker is not Redis or cannot be read: the sweeper then decides by age alone.
    """
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    import json

    import redis

    try:
        client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=3)
        try:
            raw = [m for q in queues for m in client.lrange(q, 0, -1)]
            unacked = [json.loads(v)[0] for v in client.hvals("unacked")]
        finally:
            client.close()
        ids = {json.loads(m)["headers"]["id"] for m in raw}
        return ids | {m["headers"]["id"] for m in unacked}
    except Exception as e:  # noqa: BLE001 - broker down or an unexpected message: fall back to age
        log.info("broker contents unreadable (%s: %s)", type(e).__name__, e)
        return None


class _SweepClock:
    """When this process last swept successfully: after a gap (the database was away, or this process stalled),
    heartbeats missed meanwhile say nothing about the workers, so dead-worker recovery waits one stale period."""

    last_ok: float | None = None
    grace_until = 0.0


def sweep_once(factory: sessionmaker[Session], sender: Sender, settings: Settings) -> int:
    """One sweep: send again what is lost; returns how many messages went out."""
    now = time.monotonic()
    if _SweepClock.last_ok is not None and now - _SweepClock.last_ok > 2 * settings.sweep_seconds + 5:
        _SweepClock.grace_until = now + settings.stale_after_seconds
        log.warning("sweeper was away %.0f s: no dead-worker recovery for %.0f s while workers heartbeat again",
                    now - _SweepClock.last_ok, settings.stale_after_seconds)
    queues = list(settings.queue_capacities)
    in_broker = messages_in_broker(settings.broker_url, queues)
    stale_after = dt.timedelta(seconds=settings.stale_after_seconds if now >= _SweepClock.grace_until else 1e9)
    with factory() as session:
        messages = steps.sweep(session, requeue_after=dt.timedelta(seconds=settings.requeue_after_seconds),
                               stale_after=stale_after, default_queue=queues[0], in_broker=in_broker)
    _SweepClock.last_ok = time.monotonic()
    return len(sender.send(messages))


class CeleryDispatcher:
    """The worker pool: route by memory, send after commit, revoke on cancel, sweep in a thread."""

    def __init__(self, state: Any) -> None:
        self.settings: Settings = state.settings
        self.factory = state.session_factory
        self.app = broker_app(self.settings)
        self.sender = Sender(self.app)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def route(self, session: Session, job: Job) -> None:
        from registry.routing import choose_queue, model_config

        request = job.request
        config = model_config(job.model.hf_id if job.model else request["model"], request["revision"])
        job.queue = choose_queue(config, self.settings.queue_capacities, batch_size=int(request["batch_size"]),
                                 seq_len=max(int(request["seq_len"]), int(request["eval_seq_len"])))

    def submitted(self, job_id: str) -> None:
        with self.factory() as session:
            job = session.get(Job, job_id)
            if job is None or job.status != "queued":
                return
            message = steps.start_message(job, next(iter(self.settings.queue_capacities)))
            if self.sender.send([message]):
                steps.mark_enqueued(session, [job_id])
                session.commit()

    def cancelled(self, job_id: str) -> None:
        with self.factory() as session:
            task_ids = steps.queued_task_ids(session, job_id)
        if task_ids:
            try:
                self.app.control.revoke(task_ids)
            except Exception as e:  # noqa: BLE001 - a queued step also ends itself at its claim
                log.warning("could not revoke %s (%s)", task_ids, e)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="qfilters-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.sweep_seconds):
            try:
                sweep_once(self.factory, self.sender, self.settings)
            except Exception as e:  # noqa: BLE001 - the database may be down for a while; try again next time
                log.warning("sweep failed (%s: %s); next in %.0f s", type(e).__name__, e, self.settings.sweep_seconds)


def make_dispatcher(state: Any) -> Dispatcher:
    return CeleryDispatcher(state) if state.settings.executor == "celery" else InlineDispatcher(state)
