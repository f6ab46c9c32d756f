"""The hostile probes of issue 9, one test (or more) per defect, against the real API, runner and databases.

1. dataset specs never reach the server's disk (every syntax the spec parser knows), at submit and at run time;
2. ``publish_to`` / ``force_publish`` need the publish scope; runner audit entries name the token they act for;
3. jobs belong to the token that submitted them;
4. cancellation is observed at every evaluation pass (the real-model acceptance is test_registry_cancel.py);
5. model ids are never looked up on the server's disk, unknown ones are refused at submit, never listed;
6. 413 for oversized chunked bodies, problem+json for bad framing (real uvicorn on loopback, raw sockets);
7. anonymous readers see no install paths; the SQLite file and data directory are private;
8. a refused publication answers 409 like an alias move (in the publication test); the README says a job needs two
   calibration datasets.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text, update

from tests.registry.conftest import PASSING_GATES, Registry, run_queued_jobs
from tests.registry.conftest import assert_problem as _problem
from tests.registry.conftest import job_body as _job

FAILING_GATES = {"cross_dataset_cosine": 1.01}
SECRET = "the server's private notes: do not leak"




@pytest.fixture
def server_cwd(tmp_path: Path, monkeypatch) -> Path:
    """The server's working directory holds ``notes/`` (a JSONL corpus and a model config a loader would read)."""
    cwd = tmp_path / "server-cwd"
    notes = cwd / "notes"
    notes.mkdir(parents=True)
    (notes / "a.jsonl").write_text(json.dumps({"text": SECRET * 50}) + "\n")
    (notes / "config.json").write_text(json.dumps({"model_type": "llama"}))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cwd


def _database_dump(reg: Registry) -> str:
    with reg.state.session_factory() as session:
        return "\n".join(str(row) for table in ("jobs", "datasets", "models", "audit_events")
                         for row in session.execute(text(f"SELECT * FROM {table}")).all())


# ------------------------------------------------------------------------- 1. dataset specs and the server's disk


def _local_specs(cwd: Path) -> list[str]:
    return ["hf:notes:train", "hf:notes::train:text", "hf:notes:train:text", "hf:json:train", "hf:text::train",
            "notes", "./notes", "notes/a.jsonl", "notes#text", "file:notes", "file:notes/a.jsonl", f"{cwd}/notes",
            f"file:{cwd}/notes", "/etc/hosts", "~", "~/notes", "file:~/notes", "../server-cwd/notes", "..", "*"]


def test_dataset_specs_naming_server_paths_are_refused_before_queueing(sqlite_registry, server_cwd) -> None:
    reg = sqlite_registry
    headers = reg.auth(reg.token("submit"))
    for spec in _local_specs(server_cwd):
        for body in (_job(datasets=[spec, "python-code"]), _job(eval_datasets=[spec])):
            response = reg.client.post("/v1/jobs", json=body, headers=headers)
            assert _problem(response, 422)["detail"], spec
    assert reg.client.get("/v1/jobs").json()["total"] == 0
    assert reg.client.get("/v1/datasets").json()["total"] == 0
    assert "notes" not in _database_dump(reg) and "/etc" not in _database_dump(reg)


def test_a_job_row_with_a_local_spec_fails_at_run_time_without_reading_it(sqlite_registry, server_cwd,
                                                                           tiny_llama) -> None:
    """A row written by an older version (or by hand) gets today's rules when it runs: nothing of notes/ is read."""
    from registry.models import Job

    reg = sqlite_registry
    job = reg.client.post("/v1/jobs", json=_job(), headers=reg.auth(reg.token("submit"))).json()
    with reg.state.session_factory.begin() as session:
        row = session.get(Job, job["id"])
        row.request = {**row.request, "datasets": ["hf:notes:train", "python-code"]}
    assert run_queued_jobs(reg, tiny_llama) == ["failed"]
    failed = reg.client.get(f"/v1/jobs/{job['id']}").json()
    assert "local path" in failed["error"] and "notes" in failed["error"]  # refused when read, never loaded
    secret_sha = hashlib.sha256(SECRET.encode()).hexdigest()
    assert SECRET not in _database_dump(reg) and secret_sha not in _database_dump(reg)
    assert reg.client.get("/v1/datasets").json()["total"] == 0


def test_hub_only_specs_are_never_loaded_from_a_local_directory(tmp_path, monkeypatch) -> None:
    from qfilters.data import load_corpus, parse_spec
    from qfilters.errors import DatasetSpecError, DatasetUnavailableError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    parsed = parse_spec("hf:notes:train", allow_local=False)  # nothing called notes here yet
    assert parsed.hub_only and str(parsed) == "hf:notes::train:text"
    (tmp_path / "notes").mkdir()  # ... but where the runner loads it (another process, another directory) there is
    (tmp_path / "notes" / "a.jsonl").write_text(json.dumps({"text": SECRET}) + "\n")
    with pytest.raises(DatasetSpecError, match="local path"):
        load_corpus(parsed)
    with pytest.raises(DatasetUnavailableError, match="offline"):  # a Hub name: asked of the Hub only
        load_corpus(parse_spec("hf:other-notes:train", allow_local=False))
    with pytest.raises(DatasetSpecError, match="local paths are refused"):
        parse_spec(str(tmp_path / "notes"), allow_local=False)
    assert load_corpus(parse_spec("notes")).documents[0].text == SECRET  # the library's own users keep local files


def test_hf_datasets_must_be_allow_listed_or_confirmed_by_the_hub(database_url, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reg = Registry(database_url, tmp_path / "data", allowed_datasets=["wikitext", "qfilters-test/*"])
    try:
        headers = reg.auth(reg.token("submit"))
        refused = reg.client.post("/v1/jobs", json=_job(eval_datasets=["hf:imdb::test:text"]), headers=headers)
        assert "QFILTERS_ALLOWED_DATASETS" in _problem(refused, 422)["detail"]
        for spec in ("hf:wikitext:wikitext-2-raw-v1:test:text", "hf:qfilters-test/corpus:train"):
            assert reg.client.post("/v1/jobs", json=_job(eval_datasets=[spec]), headers=headers).status_code == 201
    finally:
        reg.close()


# ----------------------------------------------------------------------------- 2. privileges follow tokens


def test_publishing_fields_in_a_job_body_need_the_publish_scope(registry) -> None:
    client = registry.client
    submitter = registry.auth(registry.token("submit"))
    for fields in ({"publish_to": "victim-org/filters"}, {"force_publish": True},
                   {"publish_to": "victim-org/filters", "force_publish": True}):
        assert "publish" in _problem(client.post("/v1/jobs", json=_job(**fields), headers=submitter), 403)["detail"]
        publisher_only = registry.auth(registry.token("publish"))  # may publish, may not submit
        assert "submit" in _problem(client.post("/v1/jobs", json=_job(**fields), headers=publisher_only),
                                    403)["detail"]
    assert client.get("/v1/jobs").json()["total"] == 0
    both = registry.auth(registry.token("submit", "publish"))
    admin = registry.auth(registry.token("admin"))
    for headers in (both, admin):
        assert client.post("/v1/jobs", json=_job(publish_to="org/filters"), headers=headers).status_code == 201


def test_a_job_publication_is_the_runner_acting_for_the_token_that_asked(sqlite_registry, tiny_llama) -> None:
    from registry.models import ApiToken

    reg = sqlite_registry
    client, admin = reg.client, reg.auth(reg.token("admin"))
    releaser = reg.auth(reg.token("submit", "publish", name="releaser"))
    passing = client.post("/v1/jobs", json=_job(gates=PASSING_GATES, publish_to="org/pass"), headers=releaser).json()
    failing = client.post("/v1/jobs", json=_job(gates=FAILING_GATES, publish_to="org/fail", seed=1),
                          headers=releaser).json()
    assert run_queued_jobs(reg, tiny_llama) == ["succeeded", "succeeded"]
    requested = client.get("/v1/audit", params={"action": "publication.request"}, headers=admin).json()["items"]
    assert len(requested) == 1 and requested[0]["actor"].startswith("runner:")
    assert requested[0]["detail"]["on_behalf_of"] == "releaser" and requested[0]["detail"]["job"] == passing["id"]
    failed_id = client.get(f"/v1/jobs/{failing['id']}").json()["filter_set_id"]
    failed_fs = client.get(f"/v1/filter-sets/{failed_id}").json()
    assert failed_fs["verdict"] == "fail" and failed_fs["publications"] == []  # failing verdict, not forced
    # 8. the API says the same: a refused publication answers 409, like moving an alias onto that version
    publication = client.post(f"/v1/filter-sets/{failed_fs['id']}/publications", json={"repo_id": "org/x"},
                              headers=releaser)
    alias = client.put(f"/v1/models/{failed_fs['model_id']}/aliases/stable", json={"filter_set_id": failed_fs["id"]},
                       headers=releaser)
    assert "force" in _problem(publication, 409)["detail"] and "force" in _problem(alias, 409)["detail"]
    assert client.get(f"/v1/filter-sets/{failed_fs['id']}").json()["publications"] == []
    finished = client.get("/v1/audit", params={"action": "job.succeeded"}, headers=admin).json()["items"]
    assert {e["detail"]["on_behalf_of"] for e in finished} == {"releaser"}

    # a token stripped of the publish scope after submitting publishes nothing when its job runs, and the job says
    # so: it fails with the reason instead of succeeding silently (second probe)
    late = client.post("/v1/jobs", json=_job(gates=PASSING_GATES, publish_to="org/late", seed=2),
                       headers=releaser).json()
    with reg.state.session_factory.begin() as session:
        session.execute(update(ApiToken).where(ApiToken.name == "releaser").values(scopes=["submit"]))
    assert run_queued_jobs(reg, tiny_llama) == ["failed"]
    assert "lost the publish scope" in client.get(f"/v1/jobs/{late['id']}").json()["error"]
    late_fs = client.get(f"/v1/jobs/{late['id']}").json()["filter_set_id"]
    assert client.get(f"/v1/filter-sets/{late_fs}").json()["publications"] == []
    skipped = client.get("/v1/audit", params={"action": "publication.skip"}, headers=admin).json()["items"]
    assert {e["detail"]["job"] for e in skipped} == {failing["id"], late["id"]}


# ------------------------------------------------------------------------------------------------ 3. job owners


def test_jobs_belong_to_the_token_that_submitted_them(registry) -> None:
    client = registry.client
    owner, other = registry.auth(registry.token("submit")), registry.auth(registry.token("submit"))
    job = client.post("/v1/jobs", json=_job(), headers=owner).json()
    assert "belongs to" in _problem(client.post(f"/v1/jobs/{job['id']}/cancel", headers=other), 403)["detail"]
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"  # untouched
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=owner).json()["status"] == "cancelled"
    _problem(client.post(f"/v1/jobs/{job['id']}/retry", headers=other), 403)
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    admin = registry.auth(registry.token("admin"))
    assert client.post(f"/v1/jobs/{job['id']}/retry", headers=admin).json()["status"] == "queued"


def test_without_public_reads_other_tokens_jobs_do_not_exist(database_url, tmp_path) -> None:
    reg = Registry(database_url, tmp_path / "private", public_reads=False)
    try:
        client = reg.client
        owner, other = reg.auth(reg.token("submit")), reg.auth(reg.token("submit"))
        job = client.post("/v1/jobs", json=_job(), headers=owner).json()
        for call in (lambda h: client.get(f"/v1/jobs/{job['id']}", headers=h),
                     lambda h: client.post(f"/v1/jobs/{job['id']}/cancel", headers=h),
                     lambda h: client.post(f"/v1/jobs/{job['id']}/retry", headers=h),
                     lambda h: client.get(f"/jobs/{job['id']}", headers=h)):
            _problem(call(other), 404)
        assert client.get("/v1/jobs", headers=other).json()["total"] == 0
        assert client.get("/v1/jobs", headers=owner).json()["total"] == 1
        assert client.get("/v1/jobs", headers=reg.auth(reg.token("admin"))).json()["total"] == 1
        assert client.get(f"/v1/jobs/{job['id']}", headers=owner).status_code == 200
    finally:
        reg.close()


# ------------------------------------------------------------------------------------------------ 4. cancellation


def test_evaluation_reports_every_forward_pass_and_offers_a_stop_between_layers(tiny_llama) -> None:
    from qfilters.validation.run import ValidationSettings, run_validation

    events = []
    settings = ValidationSettings(tokens_per_dataset=256, calib_seq_len=128, eval_seq_len=128, score_last=64,
                                  budgets=(48, 24), max_docs=2)
    run_validation(tiny_llama, ["python-code", "handbook:en"], ["python-code"], settings, on_progress=events.append)
    evaluated = sorted({e.completed for e in events if e.phase == "evaluate"})
    total = next(e.total for e in events if e.phase == "evaluate")
    assert evaluated == list(range(total + 1))  # one event per forward pass, none skipped
    # between two events of a pass, the latest one is repeated before every attention layer: a point to stop at
    layers = tiny_llama.info.num_layers
    repeats = len(events) - len({(e.phase, e.label, e.completed) for e in events})
    assert repeats >= layers * total

    def stop_in_evaluation(p) -> None:
        if p.phase == "evaluate" and p.completed == 1:
            raise KeyboardInterrupt("stop")

    seen = []
    with pytest.raises(KeyboardInterrupt):
        run_validation(tiny_llama, ["python-code", "handbook:en"], ["python-code"], settings,
                       on_progress=lambda p: (seen.append(p), stop_in_evaluation(p)))
    assert seen[-1].phase == "evaluate" and seen[-1].completed == 1


def test_the_runner_asks_whether_to_stop_every_second_while_it_throttles_writes(sqlite_registry) -> None:
    from qfilters.validation.run import Progress
    from registry.pipeline import JobCancelled, ProgressReporter
    from registry.schemas import JobCreate
    from registry.services import jobs

    reg = sqlite_registry
    headers = reg.auth(reg.token("submit"))
    job = reg.client.post("/v1/jobs", json=_job(), headers=headers).json()
    with reg.state.session_factory() as session:
        assert jobs.claim_next(session, "runner-x").id == job["id"]
    reporter = ProgressReporter(reg.state.session_factory, job["id"], "runner-x", JobCreate.model_validate(_job()),
                                min_interval=3600, cancel_interval=0.2)
    reporter(Progress("evaluate", "python-code", 0, 10))  # written at once (a phase starts)
    reporter(Progress("evaluate", "python-code", 1, 10))  # throttled, nothing to stop for
    assert reg.client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers).json()["cancel_requested"] is True
    time.sleep(0.3)
    with pytest.raises(JobCancelled):
        reporter(Progress("evaluate", "python-code", 1, 10))  # the same event repeated between layers


# ---------------------------------------------------------------------------------------------------- 5. models


def test_model_ids_are_never_looked_up_on_the_server_disk(sqlite_registry, server_cwd, monkeypatch) -> None:
    reg = sqlite_registry
    headers = reg.auth(reg.token("submit"))
    for model in ("notes", "qfilters/unknown-model-xyz"):
        for offline in ("1", "0"):  # offline mode, then a real (failing) attempt to reach the Hub: one bounded try
            monkeypatch.setenv("HF_HUB_OFFLINE", offline)
            started = time.monotonic()
            detail = _problem(reg.client.post("/v1/jobs", json=_job(model=model), headers=headers), 422)["detail"]
            assert "QFILTERS_ALLOWED_MODELS" in detail and time.monotonic() - started < 30  # not 45 s of retries
    assert reg.client.get("/v1/jobs").json()["total"] == 0
    assert reg.client.get("/v1/models").json()["total"] == 0


def test_load_model_hub_only_never_reads_a_local_directory(tmp_path, monkeypatch, tiny_llama) -> None:
    from qfilters.errors import ModelError
    from qfilters.models import load_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_llama.model.save_pretrained(tmp_path / "notes")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "notes")
    with pytest.raises(ModelError, match="cache"):
        load_model("notes", allow_local=False)
    assert load_model("notes").info.num_layers == 2  # the library's own users keep local directories


def test_models_that_never_loaded_are_not_listed(sqlite_registry, tiny_llama) -> None:
    from qfilters.errors import ModelError
    from registry.runner import JobRunner

    class Unloadable:
        def get(self, name: str, revision: str, device: str):
            raise ModelError(f"could not load model {name!r}")

    reg = sqlite_registry
    headers = reg.auth(reg.token("submit"))
    reg.client.post("/v1/jobs", json=_job(model="qfilters-test/never-loads"), headers=headers)
    runner = JobRunner(reg.state.session_factory, reg.state.store)
    runner.models = Unloadable()  # type: ignore[assignment]
    assert runner.run_once() == "failed"
    assert reg.client.get("/v1/models").json()["total"] == 0
    _problem(reg.client.get("/v1/models/1"), 404)
    reg.client.post("/v1/jobs", json=_job(), headers=headers)
    assert run_queued_jobs(reg, tiny_llama) == ["succeeded"]
    assert [m["hf_id"] for m in reg.client.get("/v1/models").json()["items"]] == ["tiny-llama"]


# ------------------------------------------------------------------------------- 6. errors before routing, over HTTP


@pytest.fixture
def http_server(sqlite_registry, tmp_path):
    """The production command of the README, on loopback: ``uvicorn registry.main:app --http
    registry.api.wire:ProblemH11Protocol``, on the test registry's database (which makes its tokens)."""
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "QFILTERS_DATABASE_URL": sqlite_registry.settings.database_url,
           "QFILTERS_DATA_DIR": str(tmp_path / "served"), "QFILTERS_ALLOWED_MODELS": "tiny-llama",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    log = open(tmp_path / "uvicorn.log", "w")  # noqa: SIM115 - the server writes to it until killed
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "registry.main:app", "--port", str(port),
                             "--http", "registry.api.wire:ProblemH11Protocol", "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "uvicorn.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "uvicorn did not start in 60 s"
                time.sleep(0.2)
        yield ("127.0.0.1", port), sqlite_registry
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _raw(address: tuple[str, int], head: bytes, body_chunks: list[bytes] = ()) -> tuple[int, dict, bytes]:
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before the body ended: read what it said
        data = b""
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            data += piece
            if b"\r\n\r\n" in data:
                head_part, _, rest = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head_part.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
    head_part, _, rest = data.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, rest


def test_framing_errors_and_oversized_chunked_bodies_are_problems(http_server) -> None:
    address, reg = http_server
    token = reg.token("submit")
    auth = f"Authorization: Bearer {token}\r\n".encode()
    bad_length = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n{}"
    bad_chunk = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
    for request in (bad_length, bad_chunk):
        status, headers, body = _raw(address, request)
        assert status == 400 and headers["content-type"] == "application/problem+json", body
        assert json.loads(body)["status"] == 400
    piece = b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 40 + [b"0\r\n\r\n"]  # 2.6 MB, no Content-Length
    head = (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            + auth + b"\r\n")
    status, headers, body = _raw(address, head, chunks)
    assert status == 413 and headers["content-type"] == "application/problem+json", body
    assert "limited to" in json.loads(body)["detail"]
    small = json.dumps(_job()).encode()
    status, _, body = _raw(address, head, [b"%x\r\n%s\r\n" % (len(small), small), b"0\r\n\r\n"])
    assert status == 201, body  # a chunked body under the limit still reaches the app whole


# ------------------------------------------------------------------------------ 7. what anonymous readers see


def test_anonymous_readers_see_no_install_paths_and_the_database_is_private(tmp_path, tiny_llama) -> None:
    data = tmp_path / "fresh-data"
    reg = Registry(f"sqlite:///{data / 'registry.sqlite3'}", data)
    try:
        reg.client.post("/v1/jobs", json=_job(), headers=reg.auth(reg.token("submit")))
        assert run_queued_jobs(reg, tiny_llama) == ["succeeded"]
        datasets = reg.client.get("/v1/datasets").json()["items"]
        python_code = next(d for d in datasets if d["spec"] == "python-code")
        assert python_code["source"] == f"CPython {sys.version.split()[0]} standard library"
        fs = reg.client.get("/v1/filter-sets/1").json()
        published = [reg.client.get(fs["links"][k]).text for k in ("report_json", "report_html")]
        published.append(reg.client.get(f"/v1/filter-sets/{fs['id']}/report.md").text)
        published += [json.dumps(datasets), reg.client.get(f"/v1/filter-sets/{fs['id']}/lineage").text]
        for page in published:
            assert sys.prefix not in page and sys.base_prefix not in page and "site-packages" not in page
        assert stat.S_IMODE(os.stat(data / "registry.sqlite3").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(data / "artifacts").st_mode) == 0o700
    finally:
        reg.close()


# --------------------------------------------------------------------------------------- 8. consistent answers


def test_the_readme_says_a_job_needs_two_calibration_datasets() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    registry_section = readme[readme.index("## The registry service"):]
    assert "at least two calibration datasets" in registry_section
    assert "### Threat model" in registry_section
