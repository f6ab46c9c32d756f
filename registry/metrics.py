"""Prometheus metrics of the service (``GET /metrics``): jobs by state from SQL, queue depth from the broker.

Workers export their own (task durations, calibration tokens/s) on ``QFILTERS_METRICS_PORT``; see
:mod:`workers.metrics`. Values are read at scrape time, so every API process reports the same truth.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from sqlalchemy import func, select

from registry.api.deps import PublicRead
from registry.models import JOB_STATUSES, Job, JobTask

log = logging.getLogger("qfilters.registry.metrics")
router = APIRouter(include_in_schema=False)


def queue_depths(broker_url: str, queues: list[str]) -> dict[str, int]:
    """Messages waiting per queue (Redis broker: one list per queue); empty when the broker cannot be read."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return {}
    try:
        import redis

        client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return {q: int(client.llen(q)) for q in queues}
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001 - a scrape must answer even with the broker down
        log.info("queue depth unavailable: %s", e)
        return {}


@router.get("/metrics")
def metrics(request: Request, _: PublicRead) -> Response:
    """Readable like the rest of the registry: by anyone with public reads on, else with a read token (Prometheus:
    ``authorization: {credentials_file: ...}``)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

    state = request.app.state.registry
    registry = CollectorRegistry()
    by_state = Gauge("qfilters_jobs", "Jobs by state", ["state"], registry=registry)
    steps = Gauge("qfilters_job_steps", "Worker-pool steps by kind and state", ["kind", "state"], registry=registry)
    depth = Gauge("qfilters_queue_depth", "Messages waiting in a broker queue", ["queue"], registry=registry)
    with state.session_factory() as session:
        counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        step_counts = session.execute(select(JobTask.kind, JobTask.status, func.count())
                                      .group_by(JobTask.kind, JobTask.status)).all()
    for status in JOB_STATUSES:
        by_state.labels(status).set(counts.get(status, 0))
    for kind, status, n in step_counts:
        steps.labels(kind, status).set(n)
    if state.settings.executor == "celery":
        for queue, n in queue_depths(state.settings.broker_url, list(state.settings.queue_capacities)).items():
            depth.labels(queue).set(n)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
