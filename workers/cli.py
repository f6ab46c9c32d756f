"""``qfilters worker``: start correctly configured Celery workers, without remembering Celery flags.

``qfilters worker --queue gpu --gpus 0,1`` starts one worker per GPU, each pinned with ``CUDA_VISIBLE_DEVICES``
(set in the environment of a fresh process, before anything imports torch), concurrency 1, prefetch 1, late acks;
``--gpus-per-worker 4`` gives one worker four GPUs, the model sharded over them. The pool is prefork: the parent
process never imports torch (tasks import it lazily), so CUDA is only ever initialised in the child that computes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Annotated

import typer


def gpu_groups(gpus: str, per_worker: int) -> list[str]:
    """``"0,1,2,3"``, 2 -> ``["0,1", "2,3"]``: the CUDA_VISIBLE_DEVICES of each worker."""
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
        raise typer.BadParameter(f"--gpus takes distinct GPU indices such as 0,1; got {gpus!r}")
    if per_worker < 1 or len(ids) % per_worker:
        raise typer.BadParameter(f"{len(ids)} GPU(s) do not split into workers of {per_worker}")
    return [",".join(ids[i:i + per_worker]) for i in range(0, len(ids), per_worker)]


def celery_command(queue: str, name: str, *, loglevel: str, beat: bool) -> list[str]:
    cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--queues", queue, "--concurrency", "1",
           "--prefetch-multiplier", "1", "--pool", "prefork", "--hostname", name, "--loglevel", loglevel,
           "--without-gossip", "--without-mingle"]
    return cmd + (["--beat"] if beat else [])


def worker(
    queue: Annotated[str, typer.Option(help="Queue to consume: cpu, gpu, or a name of QFILTERS_QUEUES.")] = "cpu",
    gpus: Annotated[str | None, typer.Option(help="GPU indices, e.g. 0,1: one worker per GPU (see below).")] = None,
    gpus_per_worker: Annotated[int, typer.Option(help="GPUs each worker owns (the model is sharded).")] = 1,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info",
    beat: Annotated[bool, typer.Option(help="Also run the periodic sweeper here (one per deployment).")] = False,
) -> None:
    """Run Celery workers for the registry's jobs (executor=celery)."""
    import socket

    host = socket.gethostname()
    if gpus is None:
        env = {**os.environ, "QFILTERS_WORKER_DEVICE": os.environ.get("QFILTERS_WORKER_DEVICE", "cpu")}
        os.execve(sys.executable, celery_command(queue, f"{queue}@{host}", loglevel=loglevel, beat=beat), env)
    groups = gpu_groups(gpus, gpus_per_worker)
    procs = []
    for i, group in enumerate(groups):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": group,
               "QFILTERS_WORKER_DEVICE": "cuda" if gpus_per_worker == 1 else "auto"}
        name = f"{queue}-gpu{group.replace(',', '+')}@{host}"
        procs.append(subprocess.Popen(celery_command(queue, name, loglevel=loglevel, beat=beat and i == 0), env=env))

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [p.wait() for p in procs]
    raise typer.Exit(max(codes, key=abs))
