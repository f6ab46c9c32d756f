"""The deployment file: every service the pool needs, with health checks, start order and GPU reservations.

Docker does not run on CI machines; this parses docker-compose.yml (merge keys resolved by PyYAML) and checks what a
broken edit would break. Where the Docker CLI has compose, ``docker compose config`` validates the file too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_services_and_their_health_checks(compose: dict) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "api", "worker-cpu", "beat", "flower"} <= set(services)
    assert [s for s in services if s.startswith("worker-gpu")], "no GPU worker"
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert {"pgdata", "redisdata", "artifacts"} <= set(compose["volumes"])


def test_start_order_waits_for_healthy_dependencies(compose: dict) -> None:
    services = compose["services"]
    assert services["api"]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                             "redis": {"condition": "service_healthy"}}
    command = " ".join(services["api"]["command"])
    assert command.index("qfilters db upgrade") < command.index("uvicorn")  # migrations first
    for name in [s for s in services if s.startswith("worker") or s == "beat"]:
        assert services[name]["depends_on"]["api"] == {"condition": "service_healthy"}, name
        env = services[name]["environment"]
        assert env["QFILTERS_EXECUTOR"] == "celery" and env["QFILTERS_BROKER_URL"].startswith("redis://redis:")
        assert "postgres:5432" in env["QFILTERS_DATABASE_URL"]


def test_each_gpu_worker_reserves_its_own_gpu_and_is_pinned_to_it(compose: dict) -> None:
    gpu_workers = {n: s for n, s in compose["services"].items() if n.startswith("worker-gpu")}
    seen = []
    for name, service in gpu_workers.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        command = service["command"]
        assert command[:2] == ["qfilters", "worker"]
        assert command[command.index("--gpus") + 1].split(",") == device["device_ids"], name
        seen += device["device_ids"]
    assert len(seen) == len(set(seen)), "two workers reserve the same GPU"


def test_env_example_names_what_compose_requires() -> None:
    example = (REPO / ".env.example").read_text()
    assert "POSTGRES_PASSWORD=" in example and "QFILTERS_QUEUES=" in example


def _compose_cli() -> list[str] | None:
    """``docker compose`` (the plugin) or ``docker-compose``, whichever this machine has; they validate client-side."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0:
            return cmd
    return None


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    cmd = _compose_cli()
    if cmd is None:
        pytest.skip("no docker compose CLI on this machine")
    (tmp_path / ".env").write_text("POSTGRES_PASSWORD=test\n")
    out = subprocess.run([*cmd, "--project-directory", str(tmp_path), "-f", str(REPO / "docker-compose.yml"),
                          "config", "-q"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
