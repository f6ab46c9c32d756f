"""Prometheus metrics of a worker process: task durations by step and outcome, calibration tokens/s.

Served on ``QFILTERS_METRICS_PORT`` by the pool process that runs the tasks (concurrency 1: one per worker).
Jobs by state and queue depth are the API's ``/metrics`` (they come from SQL and the broker, not from a worker).
"""

from __future__ import annotations

import logging

from prometheus_client import Gauge, Histogram, start_http_server

log = logging.getLogger("qfilters.workers.metrics")
TASK_SECONDS = Histogram("qfilters_task_seconds", "Duration of job steps", ["kind", "outcome"],
                         buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600))
CALIBRATION_RATE = Gauge("qfilters_calibration_tokens_per_second", "Calibration throughput of the running step")
_served = False


def task_finished(kind: str, outcome: str, seconds: float) -> None:
    TASK_SECONDS.labels(kind, outcome).observe(seconds)


def calibration_rate(tokens_per_second: float) -> None:
    CALIBRATION_RATE.set(tokens_per_second)


def serve(port: int) -> None:
    global _served
    if port and not _served:
        try:
            start_http_server(port)
            _served = True
        except OSError as e:
            log.warning("metrics port %d unavailable: %s", port, e)
