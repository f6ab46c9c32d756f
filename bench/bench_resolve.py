"""Registry ``GET /v1/resolve`` vs the MLflow tracking server's registered-model alias lookup, in one run.

    .venv/bin/python bench/bench_resolve.py --json-out resolve.json
    .venv/bin/python bench/bench_resolve.py --models 200 --connections 64 --duration 15 --warmup 3 --workers 2

What it does, on this machine, with no ML anywhere:

1. creates two fresh PostgreSQL databases (``qfilters_bench_<random>`` for the registry, ``..._mlflow`` for MLflow),
   migrates the registry's with :func:`registry.migrate.upgrade` and seeds N models ``org{i}/model{i}`` (revision
   ``main``), each with one passing filter set made of small fake files in a temporary artifact store, through
   :func:`registry.services.catalog.create_filter_set` (which also moves the ``latest`` alias);
2. installs MLflow (pinned, the full package: ``mlflow server`` is not in mlflow-skinny) into an isolated cached venv
   under ``~/.cache/qfilters/`` on first use, never into the project venv;
3. serves each in turn with the same number of server processes (``--workers``, uvicorn for both, log level
   warning): ``python -m uvicorn registry.main:app`` and ``mlflow server --backend-store-uri postgresql://...``;
   registers the same N names in MLflow over its REST API, each with one model version and one alias;
4. drives each with ``wrk`` (Debian's; installed with apt-get if missing): C connections for a fixed duration after a
   warm-up, requests cycling through the N names. Measured endpoints, the closest pair:
   registry ``GET /v1/resolve?model=org{i}/model{i}`` (default alias: stable, else latest) and MLflow
   ``GET /api/2.0/mlflow/registered-models/alias?name=org{i}-model{i}&alias=champion`` (MLflow
   reserves ``latest``, so its one alias is called ``champion``; the registry's default resolve looks up ``stable``
   first, finds none and falls back to ``latest``: two alias lookups, the more expensive path);
   throughput counts 200 responses only; latency p50/p99 are wrk's (all completed requests);
5. prints both rows and the ratio, writes the numbers as JSON (``--json-out``), stops the servers, drops the databases.

Acceptance (BENCHMARKS.md): registry throughput >= 2x MLflow's at 64 connections on PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MLFLOW_VERSION = "3.17.2"  # the newest whose mlflow-skinny twin is on PyPI at the time of writing
PSYCOPG_VERSION = "3.3.9"  # the registry's PostgreSQL driver too: the same driver on both sides
DEFAULT_PG = os.environ.get("QFILTERS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MLFLOW_ALIAS = "champion"  # MLflow reserves "latest" (and "v<N>") as alias names; the registry keeps its "latest"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qfilters"


def log(msg: str) -> None:
    print(f"[bench_resolve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------- databases


def create_database(admin_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed_registry(url: str, artifact_dir: Path, n: int) -> list[str]:
    """N models with one passing filter set each (fake files) and the ``latest`` alias; returns the Hub ids."""
    from registry.db import make_engine, make_session_factory, session_scope
    from registry.models import BaseModel_
    from registry.services import catalog
    from registry.store import ArtifactStore

    store = ArtifactStore(artifact_dir)
    engine = make_engine(url)
    names = [f"org{i}/model{i}" for i in range(n)]
    report = SimpleNamespace(
        verdict=SimpleNamespace(status="pass", model_dump=lambda mode="json": {
            "status": "pass", "reasons": [], "warnings": ["bench fixture: fake filters"]}),
        settings=SimpleNamespace(calibration=["python-code", "handbook:en"]),
    )
    report_files = {"json": b'{"schema": "bench"}', "html": b"<html><body>bench</body></html>", "md": b"# bench\n"}
    try:
        with tempfile.TemporaryDirectory(prefix="qfilters-bench-artifact-") as tmp, \
                session_scope(make_session_factory(engine)) as session:
            art = Path(tmp)
            (art / "config.json").write_text(json.dumps({"num_layers": 30, "num_kv_heads": 3, "kv_head_dim": 64}))
            for hf_id in names:
                model = BaseModel_(hf_id=hf_id, revision="main", model_type="llama", num_layers=30,
                                   num_attention_heads=9, num_kv_heads=3, head_dim=64, qk_norm=False,
                                   qkv_bias=False, rope=True)
                session.add(model)
                session.flush()
                (art / "model.safetensors").write_bytes(f"fake filters for {hf_id}".encode() * 8)
                (art / "qfilters.json").write_text(json.dumps({"provenance": {"model": hf_id, "bench": True}}))
                job = SimpleNamespace(id=None, model_id=model.id)  # no job row: filter_sets.job_id is nullable
                catalog.create_filter_set(session, store, job, art, report_files, report)  # type: ignore[arg-type]
    finally:
        engine.dispose()
    return names


# --------------------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process in its own process group, stopped (group and all) on exit."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.log_path = name, log_path
        self.log_file = open(log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)

    def wait_ready(self, url: str, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready at {url} after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        self.log_file.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the server and its workers only
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.log_file.close()


def start_registry(url: str, data_dir: Path, port: int, workers: int, logs: Path) -> Server:
    env = {**os.environ, "QFILTERS_DATABASE_URL": url, "QFILTERS_DATA_DIR": str(data_dir),
           "QFILTERS_RUN_JOBS": "false", "QFILTERS_ENVIRONMENT": "production"}
    argv = [sys.executable, "-m", "uvicorn", "registry.main:app", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    return Server("registry", argv, env, logs / "registry.log")


def mlflow_venv(version: str) -> Path:
    """The cached venv with the full ``mlflow`` package (and psycopg 3 for its PostgreSQL store), built on first use."""
    venv = CACHE / f"bench-mlflow-venv-{version}"
    done = venv / ".installed"
    if done.exists():
        return venv
    log(f"installing mlflow=={version} into {venv} (first use only; a few minutes)")
    shutil.rmtree(venv, ignore_errors=True)  # a half-built one from an interrupted install
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"mlflow=={version}",
                    f"psycopg[binary]=={PSYCOPG_VERSION}"], check=True)
    done.write_text(f"mlflow=={version} psycopg[binary]=={PSYCOPG_VERSION}\n")
    return venv


def init_mlflow_store(venv: Path, store_uri: str, artifact_root: str) -> None:
    """Create MLflow's tables once, before its workers start (they would otherwise race to create them)."""
    code = ("import sys; from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as S; "
            "S(sys.argv[1], sys.argv[2]); "
            "from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as R; R(sys.argv[1])")
    subprocess.run([str(venv / "bin" / "python"), "-c", code, store_uri, artifact_root], check=True,
                   stdout=subprocess.DEVNULL)


def start_mlflow(venv: Path, store_uri: str, artifact_root: str, port: int, workers: int, logs: Path) -> Server:
    env = {**os.environ, "MLFLOW_LOGGING_LEVEL": "WARNING"}
    argv = [str(venv / "bin" / "mlflow"), "server", "--backend-store-uri", store_uri,
            "--default-artifact-root", artifact_root, "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--uvicorn-opts", "--log-level warning --no-access-log"]
    return Server("mlflow", argv, env, logs / "mlflow.log")


def seed_mlflow(base: str, names: list[str]) -> list[str]:
    """Register the names (Hub-style ``org/name`` becomes ``org-name``), one version each, alias ``latest``."""
    import httpx

    api = f"{base}/api/2.0/mlflow"
    out = []
    with httpx.Client(timeout=30) as client:
        for hf_id in names:
            name = hf_id.replace("/", "-")
            client.post(f"{api}/registered-models/create", json={"name": name}).raise_for_status()
            r = client.post(f"{api}/model-versions/create",
                            json={"name": name, "source": f"s3://bench-artifacts/{name}/filters",
                                  "description": "fake filters"})
            r.raise_for_status()
            version = r.json()["model_version"]["version"]
            client.post(f"{api}/registered-models/alias",
                        json={"name": name, "alias": MLFLOW_ALIAS, "version": version}).raise_for_status()
            out.append(name)
    return out


# ------------------------------------------------------------------------------------------------------------ load


WRK_LUA = r"""
local paths = {%(paths)s}
local threads = {}
local tid = 0
function setup(thread)
  thread:set("tid", tid)
  tid = tid + 1
  table.insert(threads, thread)
end
function init(args)
  ok = 0
  bad = 0
  counter = tid * 97
end
function request()
  counter = counter + 1
  return wrk.format("GET", paths[(counter %% #paths) + 1])
end
function response(status, headers, body)
  if status == 200 then ok = ok + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
  local o, b = 0, 0
  for _, t in ipairs(threads) do
    o = o + t:get("ok")
    b = b + t:get("bad")
  end
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "ok": %%d, "non200": %%d, "connect_errors": %%d, ' ..
    '"read_errors": %%d, "write_errors": %%d, "timeouts": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, ' ..
    '"mean_us": %%.1f, "max_us": %%d}\n',
    summary.requests, summary.duration, o, b, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    latency.max))
end
"""


def ensure_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk:
        return wrk
    log("wrk is missing: apt-get install -y wrk")
    if os.geteuid() != 0:
        raise SystemExit("wrk is not installed and this is not root: apt-get install wrk first")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, env={**os.environ,
                                                                              "DEBIAN_FRONTEND": "noninteractive"})
    wrk = shutil.which("wrk")
    if not wrk:
        raise SystemExit("wrk did not install")
    return wrk


def run_wrk(wrk: str, base: str, paths: list[str], *, connections: int, threads: int, seconds: float,
            tmp: Path) -> dict:
    script = tmp / f"cycle-{uuid.uuid4().hex[:6]}.lua"
    script.write_text(WRK_LUA % {"paths": ", ".join(json.dumps(p) for p in paths)})
    argv = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "10s",
            "-s", str(script), base]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    r = json.loads(line[len("WRKJSON "):])
    seconds_run = r["duration_us"] / 1e6
    r.update(seconds=round(seconds_run, 3), throughput_rps=round(r["ok"] / seconds_run, 1),
             p50_ms=round(r["p50_us"] / 1000, 2), p90_ms=round(r["p90_us"] / 1000, 2),
             p99_ms=round(r["p99_us"] / 1000, 2), mean_ms=round(r["mean_us"] / 1000, 2),
             errors=r["non200"] + r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"])
    return r


def cpu_seconds(pgid: int, database: str | None) -> float:
    """CPU time (user + system) of a server's process group and of the PostgreSQL backends serving ``database``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            mine = os.getpgid(int(pid)) == pgid
            if not mine and database:
                mine = f" {database} " in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if mine:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError):
            continue  # gone meanwhile
    return total / tick


def measure(name: str, wrk: str, target: dict, args: argparse.Namespace, tmp: Path) -> dict:
    """Warm up, then one measured wrk run; adds the server's CPU time per request (its processes + its backends)."""
    log(f"{name}: warm-up {args.warmup:g} s, then {args.duration:g} s at {args.connections} connections")
    run = dict(connections=args.connections, threads=args.wrk_threads, tmp=tmp)
    if args.warmup > 0:
        run_wrk(wrk, target["base"], target["paths"], seconds=args.warmup, **run)
    load0 = os.getloadavg()[0]
    cpu0 = cpu_seconds(target["pgid"], target["database"])
    r = run_wrk(wrk, target["base"], target["paths"], seconds=args.duration, **run)
    cpu = cpu_seconds(target["pgid"], target["database"]) - cpu0
    r.update(loadavg_1m_before=round(load0, 2), loadavg_1m_after=round(os.getloadavg()[0], 2),
             server_cpu_s=round(cpu, 2), server_cpu_ms_per_request=round(cpu * 1000 / max(r["requests"], 1), 2))
    log(f"{name}: {r['throughput_rps']} req/s (200s), p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
        f"errors {r['errors']}, server CPU {r['server_cpu_ms_per_request']} ms/request")
    return r


@contextmanager
def paused(pgids: list[int]) -> Iterator[None]:
    """Stop these process groups for the duration (they keep their sockets and database connections)."""
    for pgid in pgids:
        os.killpg(pgid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pgid in pgids:
            os.killpg(pgid, signal.SIGCONT)


def summarize(rounds: list[dict]) -> dict:
    """The round with the median throughput (its latencies with it), plus every round's throughput."""
    ranked = sorted(rounds, key=lambda r: r["throughput_rps"])
    median = dict(ranked[(len(ranked) - 1) // 2])
    cpu = sorted(r["server_cpu_ms_per_request"] for r in rounds)
    median.update(rounds_throughput_rps=[r["throughput_rps"] for r in rounds],
                  median_server_cpu_ms_per_request=cpu[(len(cpu) - 1) // 2])
    return median


def check_registry(base: str, hf_id: str) -> None:
    import httpx

    r = httpx.get(f"{base}/v1/resolve", params={"model": hf_id}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["model"] == hf_id and body["alias"] == "latest" and len(body["files"]) == 3, body


def check_mlflow(base: str, name: str) -> None:
    import httpx

    r = httpx.get(f"{base}/api/2.0/mlflow/registered-models/alias", params={"name": name, "alias": MLFLOW_ALIAS},
                  timeout=10)
    r.raise_for_status()
    assert r.json()["model_version"]["name"] == name, r.json()


# ------------------------------------------------------------------------------------------------------------ main


def print_table(results: dict, args: argparse.Namespace) -> None:
    reg, mlf = results["registry"], results.get("mlflow")
    rows = [("qfilters registry  GET /v1/resolve", reg)]
    if mlf:
        rows.append((f"MLflow {results['mlflow_version']}  GET registered-models/alias", mlf))
    title = (f"{args.connections} connections, {args.duration:g} s x {args.rounds} rounds (median), {args.workers} "
             f"server processes each, {args.models} models, PostgreSQL")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in ("server / endpoint", "req/s (200)", "p50 ms", "p99 ms", "errors", "CPU ms/req", "rounds req/s"):
            table.add_column(col, justify="left" if col.startswith("server") else "right")
        for label, r in rows:
            table.add_row(label, f"{r['throughput_rps']:.1f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                          str(r["errors"]), f"{r['median_server_cpu_ms_per_request']:.2f}",
                          " ".join(f"{x:.0f}" for x in r["rounds_throughput_rps"]))
        Console(width=140).print(table)
    except ImportError:
        print(title)
        for label, r in rows:
            print(f"{label:55s} {r['throughput_rps']:10.1f} req/s  p50 {r['p50_ms']:8.2f} ms  "
                  f"p99 {r['p99_ms']:8.2f} ms  errors {r['errors']}  "
                  f"CPU {r['median_server_cpu_ms_per_request']} ms/req")
    if mlf:
        print(f"throughput ratio registry / MLflow: {results['ratio_throughput']:.2f}x (target >= 2x: "
              f"{'met' if results['ratio_throughput'] >= 2 else 'NOT met'}); per round: "
              f"{', '.join(f'{x:.2f}x' for x in results['ratio_throughput_rounds'])}; p50 MLflow / registry: "
              f"{results['ratio_p50']:.2f}x; server CPU per request MLflow / registry: {results['ratio_cpu']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=200, help="registered models (names cycled by the load)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--duration", type=float, default=15.0, help="measured seconds per server and round")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each measured run")
    ap.add_argument("--rounds", type=int, default=3, help="measured runs per server, interleaved (order alternates); "
                                                          "the median-throughput round is reported")
    ap.add_argument("--workers", type=int, default=2, help="server processes, the same for both (uvicorn workers)")
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (the load generator shares the cores)")
    ap.add_argument("--pg-admin-url", default=DEFAULT_PG, help="a PostgreSQL database to connect to for CREATE "
                                                                "DATABASE / DROP DATABASE")
    ap.add_argument("--mlflow-version", default=MLFLOW_VERSION)
    ap.add_argument("--mlflow-store", choices=("postgresql", "sqlite"), default="postgresql")
    ap.add_argument("--skip-mlflow", action="store_true", help="measure the registry only")
    ap.add_argument("--keep-logs", type=Path, help="copy the servers' logs here")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    wrk = ensure_wrk()
    venv = None if args.skip_mlflow else mlflow_venv(args.mlflow_version)
    tag = uuid.uuid4().hex[:10]
    reg_db, mlf_db = f"qfilters_bench_{tag}", f"qfilters_bench_{tag}_mlflow"
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "registry_endpoint": "GET /v1/resolve?model=org{i}/model{i}",
    }
    targets: dict[str, dict] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qfilters-bench-resolve-")))
        logs = tmp / "logs"
        logs.mkdir()
        if args.keep_logs:
            stack.callback(lambda: shutil.copytree(logs, args.keep_logs, dirs_exist_ok=True))

        # ---- registry: migrate, seed, serve
        url = create_database(args.pg_admin_url, reg_db)
        stack.callback(drop_database, args.pg_admin_url, reg_db)
        from registry.migrate import upgrade

        upgrade(url)
        t0 = time.perf_counter()
        names = seed_registry(url, tmp / "data" / "artifacts", args.models)
        log(f"registry: migrated and seeded {len(names)} models in {time.perf_counter() - t0:.1f} s ({reg_db})")
        port = free_port()
        server = start_registry(url, tmp / "data", port, args.workers, logs)
        stack.callback(server.stop)
        base = f"http://127.0.0.1:{port}"
        server.wait_ready(f"{base}/v1/resolve?model={names[0]}")
        check_registry(base, names[-1])
        targets["registry"] = dict(base=base, paths=[f"/v1/resolve?model={n}" for n in names], pgid=server.proc.pid,
                                   database=reg_db)

        # ---- MLflow: its own database, tables created once, serve, register the same names
        if venv is not None:
            results["mlflow_version"] = args.mlflow_version
            results["mlflow_endpoint"] = ("GET /api/2.0/mlflow/registered-models/alias?name=org{i}-model{i}&alias="
                                          + MLFLOW_ALIAS)
            if args.mlflow_store == "postgresql":
                # SQLAlchemy 2.1 (MLflow's) reads plain postgresql:// as psycopg 3 too; say so explicitly
                store_uri = "postgresql+psycopg://" + create_database(args.pg_admin_url, mlf_db).split("://", 1)[1]
                stack.callback(drop_database, args.pg_admin_url, mlf_db)
            else:
                store_uri = f"sqlite:///{tmp / 'mlflow.sqlite3'}"
            results["mlflow_store"] = args.mlflow_store
            artifact_root = (tmp / "mlartifacts").as_uri()
            init_mlflow_store(venv, store_uri, artifact_root)
            port = free_port()
            mserver = start_mlflow(venv, store_uri, artifact_root, port, args.workers, logs)
            stack.callback(mserver.stop)
            mbase = f"http://127.0.0.1:{port}"
            mserver.wait_ready(f"{mbase}/health")
            t0 = time.perf_counter()
            mnames = seed_mlflow(mbase, names)
            log(f"mlflow: registered {len(mnames)} models in {time.perf_counter() - t0:.1f} s")
            check_mlflow(mbase, mnames[-1])
            targets["mlflow"] = dict(
                base=mbase, pgid=mserver.proc.pid, database=mlf_db if args.mlflow_store == "postgresql" else None,
                paths=[f"/api/2.0/mlflow/registered-models/alias?name={n}&alias={MLFLOW_ALIAS}" for n in mnames])

        # ---- load: rounds interleaved, the order alternating; the other server is paused (SIGSTOP) meanwhile, as
        # an "idle" MLflow server keeps background threads busy after its first load and would slow the registry
        rounds: dict[str, list[dict]] = {name: [] for name in targets}
        for i in range(args.rounds):
            for name in (list(targets) if i % 2 == 0 else list(reversed(targets))):
                others = [t["pgid"] for other, t in targets.items() if other != name]
                with paused(others):
                    rounds[name].append(measure(f"{name} round {i + 1}/{args.rounds}", wrk, targets[name], args,
                                                tmp))
        for name, runs in rounds.items():
            results[name] = summarize(runs)
            results[name]["rounds"] = runs
        if "mlflow" in results:
            reg, mlf = results["registry"], results["mlflow"]
            results["ratio_throughput"] = round(reg["throughput_rps"] / mlf["throughput_rps"], 3)
            results["ratio_throughput_rounds"] = [round(a["throughput_rps"] / b["throughput_rps"], 3)
                                                  for a, b in zip(rounds["registry"], rounds["mlflow"], strict=True)]
            results["ratio_p50"] = round(mlf["p50_ms"] / reg["p50_ms"], 3)
            results["ratio_p99"] = round(mlf["p99_ms"] / reg["p99_ms"], 3)
            results["ratio_cpu"] = round(mlf["median_server_cpu_ms_per_request"]
                                         / reg["median_server_cpu_ms_per_request"], 3)

    print_table(results, args)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
