"""What the worker pool adds to a job: queueing, SQL, artifact I/O, as a share of the calibration compute.

    python bench/bench_pipeline.py                      # SmolLM2, 2 datasets x 32,768 tokens = 65,536 tokens
    python bench/bench_pipeline.py --tokens 4096        # a quick run

Real processes, as in production: our own redis-server (free port), a fresh database on the machine's PostgreSQL
(``QFILTERS_TEST_PG_URL``), ``qfilters serve`` with ``QFILTERS_EXECUTOR=celery``, and one ``qfilters worker``. A small
warm-up job first loads the model in the worker (a warm pool, as in steady state). Then the measured job:

* overhead = job wall time (row created -> succeeded) - compute (the library's own timing of each calibration run and
  of the validation), i.e. everything the pipeline does around the compute, with one worker so nothing overlaps;
* submit -> first calibration batch processed: from the client's POST to the first step row with tokens > 0, and its
  queueing part (POST -> the calibration step claimed by the worker).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _job(tokens: int) -> dict:
    return {"model": "smollm2", "datasets": ["handbook:en", "python-code"], "eval_datasets": ["austen"],
            "tokens": tokens, "seq_len": 1024, "batch_size": 2, "eval_seq_len": 256, "score_last": 128,
            "budgets": [64, 32], "max_docs": 1}


def main() -> None:
    import psycopg

    from tests.workers.conftest import PG_ADMIN_URL, RedisServer, Stack, wait_until

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768, help="calibration tokens per dataset (2 datasets)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qfilters-bench-pipeline-"))
    db = f"qfilters_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    redis_server = RedisServer(work)
    stack = Stack(work, PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + db, redis_server.url, work / "hf",
                  stale_after_seconds=600, sweep_seconds=5)
    try:
        stack.start_api()
        stack.start_worker("w0")
        warm = stack.submit({**_job(1024), "seq_len": 512})
        assert stack.wait_final([warm["id"]], 900)[warm["id"]]["status"] == "succeeded"

        t_submit = time.time()
        job = stack.submit(_job(args.tokens))
        first = wait_until(lambda: stack.sql(
            "SELECT extract(epoch FROM started_at) FROM job_tasks WHERE job_id = :j AND tokens_done > 0",
            j=job["id"]), 600, "the first calibration batch", interval=0.02)
        t_first = time.time()
        final = stack.wait_final([job["id"]], 3600)[job["id"]]
        assert final["status"] == "succeeded", final
        (wall,) = stack.sql("SELECT extract(epoch FROM finished_at - created_at) FROM jobs WHERE id = :j",
                            j=job["id"])[0]
        rows = stack.sql("SELECT kind, seconds FROM job_tasks WHERE job_id = :j", j=job["id"])
        calibration = sum(s for k, s in rows if k == "calibrate")
        validation = sum(s for k, s in rows if k == "validate")
        overhead = float(wall) - calibration - validation
        result = {
            "tokens": 2 * args.tokens, "job_wall_s": round(float(wall), 2),
            "calibration_compute_s": round(calibration, 2), "validation_compute_s": round(validation, 2),
            "pipeline_overhead_s": round(overhead, 2),
            "overhead_pct_of_calibration": round(100 * overhead / calibration, 2),
            "submit_to_first_batch_s": round(t_first - t_submit, 2),
            "submit_to_calibration_claimed_s": round(float(first[0][0]) - t_submit, 2),
            "calibration_tokens_per_s": round(2 * args.tokens / calibration, 1),
        }
    finally:
        stack.close()
        redis_server.stop()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
