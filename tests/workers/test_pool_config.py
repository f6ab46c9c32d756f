"""Configuration the pool's safety rests on, checked without running a worker: queue routing by memory, the worker
command line, the Celery settings, and an API in celery mode that never imports torch or task code."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LLAMA_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                 intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False)
QUEUES = {"cpu": 16.0, "gpu": 80.0, "gpu-x4": 320.0}


def test_parameter_count_matches_known_models() -> None:
    from registry.routing import EMBEDDED_CONFIGS, parameter_count

    assert parameter_count(EMBEDDED_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"]) == pytest.approx(135e6, rel=0.03)
    assert parameter_count(LLAMA_70B) == pytest.approx(70.6e9, rel=0.02)


def test_jobs_go_to_the_smallest_queue_that_holds_their_model() -> None:
    from registry.errors import Unprocessable
    from registry.routing import EMBEDDED_CONFIGS, choose_queue

    smol = EMBEDDED_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert choose_queue(smol, QUEUES, batch_size=2, seq_len=1024) == "cpu"
    assert choose_queue(LLAMA_70B, QUEUES, batch_size=2, seq_len=1024) == "gpu-x4"  # never a one-GPU worker
    assert choose_queue(None, QUEUES, batch_size=2, seq_len=1024) == "cpu"  # unknown config: the default queue
    with pytest.raises(Unprocessable, match="needs about 1[0-9]{2} GiB on queue 'gpu', which offers 80 GiB"):
        choose_queue(LLAMA_70B, {"cpu": 16.0, "gpu": 80.0}, batch_size=2, seq_len=1024)


def test_queues_setting_is_checked() -> None:
    from registry.config import parse_queues

    assert parse_queues("cpu=16, gpu=80") == {"cpu": 16.0, "gpu": 80.0}
    for bad in ("", "gpu", "gpu=big", "gpu=-1", "a b=3"):
        with pytest.raises(ValueError):
            parse_queues(bad)


def test_worker_command_pins_gpus_and_runs_one_task_at_a_time() -> None:
    import typer

    from workers.cli import celery_command, gpu_groups

    assert gpu_groups("0,1", 1) == ["0", "1"]
    assert gpu_groups("0,1,2,3", 4) == ["0,1,2,3"]
    for gpus, per in (("0,0", 1), ("0,1,2", 2), ("a", 1)):
        with pytest.raises(typer.BadParameter):
            gpu_groups(gpus, per)
    cmd = celery_command("gpu", "gpu-gpu0@h", loglevel="info", beat=False)
    flags = dict(itertools.pairwise(cmd))
    assert flags["--queues"] == "gpu" and flags["--concurrency"] == "1" and flags["--prefetch-multiplier"] == "1"
    assert flags["--pool"] == "prefork"  # the parent never imports torch; CUDA starts in the child only


def test_celery_settings_make_a_crash_cost_nothing() -> None:
    from registry.config import Settings
    from workers.app import make_app

    conf = make_app(Settings(database_url="sqlite://", task_soft_time_limit=3600)).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.task_time_limit > conf.task_soft_time_limit == 3600
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit


def test_the_api_in_celery_mode_imports_neither_torch_nor_task_code(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from fastapi.testclient import TestClient
        from registry.config import Settings
        from registry.db import session_scope
        from registry.main import create_app
        from registry.migrate import upgrade
        from registry.services import tokens

        url = "sqlite:///{tmp_path}/r.sqlite3"
        upgrade(url)
        app = create_app(Settings(database_url=url, data_dir=Path("{tmp_path}"), executor="celery",
                                  broker_url="redis://127.0.0.1:1/0"), run_jobs=True)
        with session_scope(app.state.registry.session_factory) as s:
            _, token = tokens.create_token(s, "t", ["submit"])
        body = {{"model": "smollm2", "datasets": ["handbook:en", "handbook:fr"], "eval_datasets": ["python-code"],
                "tokens": 256, "seq_len": 128, "eval_seq_len": 128, "budgets": [48, 24]}}
        with TestClient(app) as c:
            r = c.post("/v1/jobs", json=body, headers={{"Authorization": "Bearer " + token}})
            metrics = c.get("/metrics").text
        loaded = [m for m in ("torch", "transformers", "workers.tasks", "workers.jobcode") if m in sys.modules]
        print(json.dumps({{"status": r.status_code, "queue_metric": "qfilters_jobs" in metrics, "loaded": loaded}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # the broker is unreachable: the job is still accepted (the sweeper sends it later), and nothing heavy loaded
    assert result == {"status": 201, "queue_metric": True, "loaded": []}


def test_the_local_store_keeps_blobs_private(tmp_path: Path) -> None:
    import stat

    from registry.store import open_store

    store = open_store(tmp_path / "artifacts")
    sha, _ = store.put_bytes(b"filters")
    assert stat.S_IMODE(store.path_for(sha).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "artifacts").stat().st_mode) == 0o700
    assert [p.name for p in store.path_for(sha).parent.iterdir()] == [sha]  # no temporary file left


def test_an_fsspec_url_gives_the_same_content_addressed_store() -> None:
    import hashlib

    from registry.store import ArtifactStore, RemoteArtifactStore, open_store

    store = open_store(f"memory://qfilters-test-{id(object())}/artifacts")
    assert isinstance(store, RemoteArtifactStore)
    sha, size = store.put_bytes(b"per-dataset calibration")
    assert (sha, size) == (hashlib.sha256(b"per-dataset calibration").hexdigest(), 23)
    assert store.put_bytes(b"per-dataset calibration") == (sha, size)  # the same bytes are stored once
    assert store.read_bytes(sha) == b"per-dataset calibration"
    with pytest.raises(FileNotFoundError):  # content never stored is not there
        store.read_bytes("0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        store.read_bytes("../../etc/passwd")
    assert type(open_store("/tmp/x")) is ArtifactStore and type(open_store("file:///tmp/x")) is ArtifactStore
