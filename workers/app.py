"""The workers' Celery app: ``celery -A workers.app worker`` (``qfilters worker`` builds that command for you).

Settings that make a crash cost nothing: late acks and rejection on a lost worker (an unfinished task goes back to
the queue), prefetch 1 (a long calibration never holds a second job hostage), a broker visibility timeout longer than
the longest task, soft and hard time limits. Importing this module imports no torch: tasks load it lazily, in the
pool's child process, so CUDA is never initialised in a parent that forks.
"""

from __future__ import annotations

from typing import Any

from registry.config import Settings, get_settings


def make_app(settings: Settings) -> Any:
    from celery import Celery

    from registry.dispatch import broker_app

    app = broker_app(settings, name="qfilters-workers")
    soft = settings.task_soft_time_limit
    app.conf.update(
        include=["workers.tasks"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=soft,
        task_time_limit=soft + 60,
        broker_transport_options={"visibility_timeout": int(soft + 600)},  # longer than the longest task
        task_ignore_result=True,  # the SQL row is the result
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # for Flower
        task_send_sent_event=True,
        beat_schedule={"sweep": {"task": "qfilters.sweep", "schedule": settings.sweep_seconds,
                                 "options": {"queue": next(iter(settings.queue_capacities)),
                                             "expires": settings.sweep_seconds}}},
    )
    assert isinstance(app, Celery)
    return app


app = make_app(get_settings())
