"""The registry's REST API on real PostgreSQL and SQLite: auth, idempotent jobs, the job pipeline, catalogue, aliases,
resolve, downloads, errors. Jobs run through the real runner protocol on the tiny random Llama (fast); the real-model
run over real HTTP is in test_registry_e2e.py."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from sqlalchemy import select, text, update

from tests.registry.conftest import PASSING_GATES, Registry, _create_pg_database, _drop_pg_database, run_queued_jobs
from tests.registry.conftest import assert_problem as _problem
from tests.registry.conftest import job_body as _job

FAILING_GATES = {"cross_dataset_cosine": 1.01}  # no two calibrations agree to more than 1: always fails




# ------------------------------------------------------------------------------------------------------ auth


def test_writes_need_a_token_with_the_right_scope(registry) -> None:
    client = registry.client
    _problem(client.post("/v1/jobs", json=_job()), 401)
    reader = registry.token("read")
    detail = _problem(client.post("/v1/jobs", json=_job(), headers=registry.auth(reader)), 403)["detail"]
    assert "submit" in detail
    _problem(client.post("/v1/jobs", json=_job(), headers=registry.auth("qft_not-a-real-token")), 401)
    assert client.post("/v1/jobs", json=_job(), headers=registry.auth(registry.token("submit"))).status_code == 201
    assert client.get("/v1/audit", headers=registry.auth(reader)).status_code == 403


def test_tokens_are_stored_hashed_and_never_in_the_audit_trail(registry) -> None:
    from registry.models import ApiToken, AuditEvent

    clear = registry.token("admin", name="ops")
    with registry.state.session_factory() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == "ops"))
        assert row.token_hash == hashlib.sha256(clear.encode()).hexdigest()
        assert clear[len(row.prefix):] not in str(row.__dict__)
        events = session.scalars(select(AuditEvent)).all()
        assert events and all(clear not in str(e.detail) for e in events)
        dump = "\n".join(str(r) for r in session.execute(text("SELECT * FROM api_tokens")).all())
        assert clear not in dump


def test_public_reads_can_be_turned_off(database_url, tmp_path) -> None:
    from tests.registry.conftest import Registry

    reg = Registry(database_url, tmp_path / "private", public_reads=False)
    try:
        _problem(reg.client.get("/v1/models"), 401)
        _problem(reg.client.get("/models"), 401)
        assert reg.client.get("/v1/models", headers=reg.auth(reg.token("read"))).status_code == 200
    finally:
        reg.close()


# ------------------------------------------------------------------------------------------- submission, input


def test_idempotency_key_same_body_same_job_other_body_conflict(registry) -> None:
    client, headers = registry.client, registry.auth(registry.token("submit"))
    first = client.post("/v1/jobs", json=_job(), headers={**headers, "Idempotency-Key": "k-1"})
    assert first.status_code == 201 and first.headers["location"].endswith(first.json()["id"])
    # the same request, spelled differently (explicit default revision), is the same job
    again = client.post("/v1/jobs", json=_job(revision="main"), headers={**headers, "Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", json=_job(seed=1), headers={**headers, "Idempotency-Key": "k-1"})
    assert "different request body" in _problem(other, 409)["detail"]
    # another token may use the same key for its own job; no key always means a new job
    mine = client.post("/v1/jobs", json=_job(), headers={**registry.auth(registry.token("submit")),
                                                         "Idempotency-Key": "k-1"})
    assert mine.status_code == 201 and mine.json()["id"] != first.json()["id"]
    ids = {client.post("/v1/jobs", json=_job(), headers=headers).json()["id"] for _ in range(2)}
    assert len(ids) == 2
    assert client.get("/v1/jobs").json()["total"] == 4


@pytest.mark.parametrize("change, words", [
    ({"model": "../../etc/passwd"}, "not a valid model"),
    ({"model": "org/name/extra"}, "not a valid model"),
    ({"model": "org/..name"}, "not a valid model"),
    ({"revision": "../main"}, "not a valid revision"),
    ({"datasets": ["/etc/passwd", "python-code"]}, "local paths are refused"),
    ({"datasets": ["file:/etc/hosts", "python-code"]}, "local paths are refused"),
    ({"datasets": ["handbok:en", "python-code"]}, "not available on the service"),
    ({"datasets": ["handbook:xx", "python-code"]}, "handbook"),
    ({"datasets": ["python-code"]}, "at least 2"),
    ({"datasets": ["python-code", "python-code"]}, "distinct"),
    ({"budgets": [128]}, "not below the evaluation length"),
    ({"score_last": 500}, "score_last"),
    ({"gates": {"no_such_gate": 1}}, "unknown gate"),
    ({"publish_to": "org/../x"}, "not a valid model or repo id"),
    # a third hostile probe: "$" matched before a trailing newline; config and column parts were not checked; a
    # job could be evaluated on its own calibration text; sizes were bounded by the schema only (131072 x 256)
    ({"model": "org/name\n"}, "not a valid model"),
    ({"revision": "main\n"}, "not a valid revision"),
    ({"publish_to": "evil/x\n"}, "not a valid model or repo id"),
    ({"datasets": ["hf:org/name\n:train", "python-code"]}, "not a Hub dataset name"),
    ({"datasets": ["hf:org/name:/etc/passwd:train:text", "python-code"]}, "not a dataset config name"),
    ({"datasets": ["hf:org/name:cfg:train:a\u0001b", "python-code"]}, "not a column name"),
    ({"datasets": ["hf:org/x:train[:10\n]", "python-code"]}, "not a split"),
    ({"eval_datasets": ["handbook:en"]}, "held out from calibration"),
    ({"eval_datasets": ["handbook:en-US"]}, "held out from calibration"),
    # one Hub dataset, config and split, whatever the slice, column or case of its id
    ({"datasets": ["hf:org/x:train[:10%]", "python-code"], "eval_datasets": ["hf:Org/X:default:train+test:body"]},
     "held out from calibration"),
    ({"seq_len": 131_072, "tokens": 131_072}, "QFILTERS_MAX_SEQ_LEN"),
    ({"eval_seq_len": 65_536}, "QFILTERS_MAX_SEQ_LEN"),
    ({"passkey_trials": 2, "passkey_context": 65_536, "eval_seq_len": 128}, "QFILTERS_MAX_SEQ_LEN"),
    ({"seq_len": 8192, "batch_size": 256, "tokens": 8192}, "QFILTERS_MAX_BATCH_TOKENS"),
    ({"surprise": 1}, "extra"),
])
def test_bad_submissions_get_a_422_that_says_what_to_fix(sqlite_registry, change, words) -> None:
    response = sqlite_registry.client.post("/v1/jobs", json=_job(**change),
                                           headers=sqlite_registry.auth(sqlite_registry.token("submit")))
    assert words.lower() in _problem(response, 422)["detail"].lower()
    assert sqlite_registry.client.get("/v1/jobs").json()["total"] == 0  # nothing half-written


def test_malformed_json_oversized_bodies_and_unknown_ids_are_problems_not_500s(sqlite_registry) -> None:
    client, headers = sqlite_registry.client, sqlite_registry.auth(sqlite_registry.token("admin"))
    _problem(client.post("/v1/jobs", content=b"{not json", headers={**headers, "content-type": "application/json"}),
             422)
    huge = b'{"model": "' + b"a" * 2_000_000 + b'"}'
    _problem(client.post("/v1/jobs", content=huge, headers={**headers, "content-type": "application/json"}), 413)
    _problem(client.get("/v1/jobs/" + "0" * 32), 404)
    _problem(client.get("/v1/jobs/not-a-job-id"), 422)
    _problem(client.get("/v1/filter-sets/99999"), 404)
    _problem(client.get("/v1/filter-sets/99999999999999999999"), 422)
    _problem(client.get("/v1/models/0"), 422)
    _problem(client.get("/v1/filter-sets/1/files/..%2F..%2Fetc%2Fpasswd"), 404)  # no route: never the disk
    _problem(client.get("/v1/filter-sets/1/files/passwd"), 422)  # only the artifact's own file names
    _problem(client.get("/nowhere"), 404)


# ------------------------------------------------------------------------------------------- the job pipeline


def test_a_job_runs_to_a_filter_set_with_verdict_report_and_downloads(registry, tiny_llama, tmp_path) -> None:
    from qfilters.artifact import QFilters
    from qfilters.validation.schema import ValidationReport

    client, headers = registry.client, registry.auth(registry.token("submit", "publish"))  # loose gates: publish
    job = client.post("/v1/jobs", json=_job(gates=PASSING_GATES), headers=headers).json()
    assert job["status"] == "queued" and job["progress"]["tokens_total"] == 2 * 256
    assert run_queued_jobs(registry, tiny_llama) == ["succeeded"]

    job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded" and job["attempts"] == 1 and job["error"] is None
    assert job["progress"]["fraction"] == 1.0 and job["progress"]["tokens_done"] == 512
    fs = client.get(f"/v1/filter-sets/{job['filter_set_id']}").json()
    assert fs["version"] == 1 and fs["verdict"] == "pass" and fs["aliases"] == ["latest"]
    assert fs["shape"] == list(tiny_llama.info.filter_shape)
    assert fs["datasets"] == ["handbook:en", "handbook:fr"]
    assert fs["provenance"]["statistics"]  # per-head statistics travel with the artifact

    report = ValidationReport.model_validate_json(client.get(fs["links"]["report_json"]).content)
    assert report.verdict.status == "pass" and report.artifact_sha256 == fs["sha256"]
    page = client.get(f"/filter-sets/{fs['id']}/report")
    assert page.status_code == 200 and "<html" in page.text.lower() and "pass" in page.text.lower()
    assert client.get(fs["links"]["report_html"]).text == page.text
    assert "|" in client.get(f"/v1/filter-sets/{fs['id']}/report.md").text  # a Markdown table for the model card

    # the files are the kvpress/Hub layout, with the sha256 as ETag, and load with the library's strict loader
    out = tmp_path / "downloaded"
    out.mkdir()
    for f in fs["files"]:
        r = client.get(f["url"])
        assert r.status_code == 200 and r.headers["etag"] == f'"{f["sha256"]}"'
        assert "immutable" in r.headers["cache-control"]
        assert hashlib.sha256(r.content).hexdigest() == f["sha256"]
        assert client.get(f["url"], headers={"If-None-Match": r.headers["etag"]}).status_code == 304
        head = client.head(f["url"])
        assert head.status_code == 200 and head.headers["etag"] == r.headers["etag"] and not head.content
        (out / f["name"]).write_bytes(r.content)
    assert {f["name"] for f in fs["files"]} == {"config.json", "model.safetensors", "qfilters.json"}
    loaded = QFilters.from_pretrained(out, expected_shape=tiny_llama.info.filter_shape)
    assert loaded.shape == tuple(fs["shape"])

    # the model row learnt its architecture, the datasets their content hash; lineage ties it all together
    model = client.get(f"/v1/models/{fs['model_id']}").json()
    assert model["hf_id"] == "tiny-llama" and model["num_kv_heads"] == 2 and model["versions"] == 1
    datasets = {d["spec"]: d for d in client.get("/v1/datasets").json()["items"]}
    assert len(datasets["handbook:fr"]["sha256"]) == 64 and datasets["handbook:en"]["tokens"] == 256
    lineage = client.get(f"/v1/filter-sets/{fs['id']}/lineage").json()
    assert lineage["job"]["id"] == job["id"]
    assert [d["spec"] for d in lineage["calibration_datasets"]] == ["handbook:en", "handbook:fr"]
    assert [d["spec"] for d in lineage["evaluation_datasets"]] == ["python-code"]


def test_versions_aliases_resolve_and_publications(registry, tiny_llama) -> None:
    client = registry.client
    submit = registry.auth(registry.token("submit", "publish"))  # loose gates need the publish scope
    publisher = registry.auth(registry.token("publish", name="release-bot"))
    for gates in (PASSING_GATES, FAILING_GATES, PASSING_GATES):
        assert client.post("/v1/jobs", json=_job(gates=gates), headers=submit).status_code == 201
        run_queued_jobs(registry, tiny_llama)
    sets = client.get("/v1/filter-sets", params={"model": "tiny-llama"}).json()
    assert sets["total"] == 3
    by_version = {fs["version"]: fs for fs in sets["items"]}
    assert [by_version[v]["verdict"] for v in (1, 2, 3)] == ["pass", "fail", "pass"]
    assert by_version[2]["verdict_reasons"]
    model_id = by_version[1]["model_id"]

    # latest follows passing versions by itself; resolve falls back to it while there is no stable
    resolved = client.get("/v1/resolve", params={"model": "tiny-llama"}).json()
    assert resolved["alias"] == "latest" and resolved["filter_set"]["version"] == 3
    assert {f["name"] for f in resolved["files"]} >= {"config.json", "model.safetensors"}

    # stable is moved explicitly, with the publish scope; a failing version needs force; moves are recorded
    submit_only = registry.auth(registry.token("submit"))
    _problem(client.put(f"/v1/models/{model_id}/aliases/stable", json={"filter_set_id": by_version[1]["id"]},
                        headers=submit_only), 403)
    conflict = client.put(f"/v1/models/{model_id}/aliases/stable", json={"filter_set_id": by_version[2]["id"]},
                          headers=publisher)
    assert "force" in _problem(conflict, 409)["detail"]
    moved = client.put(f"/v1/models/{model_id}/aliases/stable",
                       json={"filter_set_id": by_version[1]["id"], "reason": "first release"}, headers=publisher)
    assert moved.status_code == 200 and moved.json()["version"] == 1 and moved.json()["updated_by"] == "release-bot"
    resolved = client.get("/v1/resolve", params={"model": "tiny-llama", "revision": "main"}).json()
    assert resolved["alias"] == "stable" and resolved["filter_set"]["version"] == 1
    client.put(f"/v1/models/{model_id}/aliases/stable", json={"filter_set_id": by_version[2]["id"], "force": True},
               headers=publisher)
    history = client.get(f"/v1/models/{model_id}/aliases/stable/history").json()
    assert [(h["from_filter_set_id"], h["to_filter_set_id"]) for h in history] == [
        (by_version[1]["id"], by_version[2]["id"]), (None, by_version[1]["id"])]
    assert history[1]["reason"] == "first release"
    assert client.get("/v1/resolve", params={"model": "tiny-llama", "alias": "latest"}).json()["filter_set"][
        "version"] == 3

    # search by verdict, architecture, dataset
    assert client.get("/v1/filter-sets", params={"verdict": "fail"}).json()["total"] == 1
    assert client.get("/v1/filter-sets", params={"architecture": "llama"}).json()["total"] == 3
    assert client.get("/v1/filter-sets", params={"architecture": "gemma3"}).json()["total"] == 0
    assert client.get("/v1/filter-sets", params={"dataset": "handbook:en"}).json()["total"] == 3
    assert client.get("/v1/filter-sets", params={"dataset": "austen"}).json()["total"] == 0

    # publishing a failing set is refused unless forced: 409, like moving an alias onto it, and nothing recorded
    refused = client.post(f"/v1/filter-sets/{by_version[2]['id']}/publications", json={"repo_id": "org/tiny-qf"},
                          headers=publisher)
    assert "failed validation" in _problem(refused, 409)["detail"]
    forced = client.post(f"/v1/filter-sets/{by_version[2]['id']}/publications",
                         json={"repo_id": "org/tiny-qf", "force": True}, headers=publisher).json()
    assert forced["status"] == "pending" and forced["forced"] is True

    # resolve (its own fast query, files cached per process) says exactly what the filter set's own page says,
    # with the alias just moved and the publication just requested
    resolved = client.get("/v1/resolve", params={"model": "tiny-llama", "alias": "stable"}).json()
    detail = client.get(f"/v1/filter-sets/{by_version[2]['id']}").json()
    assert resolved["filter_set"] == {k: v for k, v in detail.items() if k != "provenance"}
    assert resolved["filter_set"]["aliases"] == ["stable"]
    assert [p["id"] for p in resolved["filter_set"]["publications"]] == [forced["id"]]
    assert resolved["files"] == resolved["filter_set"]["files"]

    # unknown model / alias: 404 that says what exists
    assert "submit a calibration job" in _problem(client.get("/v1/resolve", params={"model": "org/none"}), 404)[
        "detail"]
    assert "latest" in _problem(client.get("/v1/resolve", params={"model": "tiny-llama", "alias": "beta"}), 404)[
        "detail"]

    # every write is in the audit trail, with who did it
    audit = client.get("/v1/audit", params={"action": "alias.move"}, headers=registry.auth(registry.token("admin")))
    actors = [e["actor"] for e in audit.json()["items"]]
    assert actors.count("release-bot") == 2 and "system" in actors


def test_cancel_and_retry(registry, tiny_llama) -> None:
    from registry.models import Job

    client, headers = registry.client, registry.auth(registry.token("submit"))
    queued = client.post("/v1/jobs", json=_job(), headers=headers).json()
    cancelled = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=headers).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    assert run_queued_jobs(registry, tiny_llama) == []  # nothing left to run
    _problem(client.post(f"/v1/jobs/{queued['id']}/retry", headers={}), 401)
    retried = client.post(f"/v1/jobs/{queued['id']}/retry", headers=headers).json()
    assert retried["status"] == "queued" and retried["error"] is None
    _problem(client.post(f"/v1/jobs/{queued['id']}/retry", headers=headers), 409)

    # a running job is asked to stop and stops at its next progress write
    from registry.services import jobs

    with registry.state.session_factory() as session:
        claimed = jobs.claim_next(session, "runner-a")
        assert claimed.id == queued["id"]
    running = client.post(f"/v1/jobs/{queued['id']}/cancel", headers=headers).json()
    assert running["status"] == "running" and running["cancel_requested"] is True
    from registry.pipeline import execute_job
    from tests.registry.conftest import TinyModels

    status = execute_job(registry.state.session_factory, registry.state.store, queued["id"], "runner-a",
                         models=TinyModels(tiny_llama))
    assert status == "cancelled"
    final = client.get(f"/v1/jobs/{queued['id']}").json()
    assert final["status"] == "cancelled" and final["filter_set_id"] is None
    _problem(client.post(f"/v1/jobs/{queued['id']}/cancel", headers=headers), 409) if final["status"] != "cancelled" \
        else None
    with registry.state.session_factory() as session:
        assert session.get(Job, queued["id"]).finished_at is not None


def test_a_failing_job_records_the_reason(sqlite_registry) -> None:
    """A model that cannot be loaded: the job fails with the library's own message, not an internal error."""
    from qfilters.errors import ModelError
    from registry.runner import JobRunner

    class Unloadable:
        def get(self, name: str, revision: str, device: str):
            raise ModelError(f"could not load model {name!r}: not in the local cache and the Hub is unreachable")

    reg = sqlite_registry
    job = reg.client.post("/v1/jobs", json=_job(model="qfilters-test/no-such-model"),
                          headers=reg.auth(reg.token("submit"))).json()
    runner = JobRunner(reg.state.session_factory, reg.state.store)
    runner.models = Unloadable()  # type: ignore[assignment]
    assert runner.run_once() == "failed"
    failed = reg.client.get(f"/v1/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and "ModelError" in failed["error"] and "no-such-model" in failed["error"]
    assert "internal error" not in failed["error"] and failed["filter_set_id"] is None and failed["finished_at"]
    assert failed["attempts"] == 1 and runner.run_once() is None  # not retried behind the user's back


def test_runner_recovers_jobs_whose_runner_stopped(registry) -> None:
    from registry.models import Job
    from registry.services import jobs

    client, headers = registry.client, registry.auth(registry.token("submit"))
    job_id = client.post("/v1/jobs", json=_job(), headers=headers).json()["id"]
    factory = registry.state.session_factory
    for attempt in (1, 2, 3):
        with factory() as session:
            assert jobs.claim_next(session, f"dead-runner-{attempt}").id == job_id
            # the runner dies: its heartbeat goes stale
            session.execute(update(Job).where(Job.id == job_id)
                            .values(heartbeat_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)))
            session.commit()
            with factory() as fresh:  # a live runner's recent heartbeat is left alone
                assert jobs.recover_stale(fresh, dt.timedelta(hours=2)) == []
            assert jobs.recover_stale(session, dt.timedelta(minutes=1)) == [job_id]
        state = client.get(f"/v1/jobs/{job_id}").json()
        assert state["attempts"] == attempt
        assert state["status"] == ("queued" if attempt < 3 else "failed"), state
    assert "attempt 3 of 3" in state["error"]
    # a runner that lost its job cannot write progress or finish it
    with factory() as session:
        assert not jobs.finish(session, job_id, "dead-runner-3", "succeeded")


def test_openapi_and_docs_are_served_without_a_cdn(sqlite_registry) -> None:
    client = sqlite_registry.client
    spec = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/resolve", "/v1/filter-sets/{filter_set_id}/files/{name}"} <= set(spec["paths"])
    docs = client.get("/docs").text
    assert "/static/swagger/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert client.get("/static/swagger/swagger-ui-bundle.js").status_code == 200


def test_heartbeat_keeps_a_long_silent_step_from_looking_dead(sqlite_registry) -> None:
    """A step that reports no progress (a model download) must not let recovery requeue the job under the runner."""
    import time

    from registry.models import Job
    from registry.pipeline import Heartbeat
    from registry.services import jobs

    reg = sqlite_registry
    job_id = reg.client.post("/v1/jobs", json=_job(), headers=reg.auth(reg.token("submit"))).json()["id"]
    factory = reg.state.session_factory
    with factory() as session:
        jobs.claim_next(session, "busy-runner")
        session.execute(update(Job).where(Job.id == job_id)
                        .values(heartbeat_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)))
        session.commit()
    with Heartbeat(factory, job_id, "busy-runner", interval=0.05):
        time.sleep(0.5)
        with factory() as session:
            assert jobs.recover_stale(session, dt.timedelta(minutes=1)) == []
    assert reg.client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"


def test_resolve_file_cache_keeps_the_most_recently_used_listings() -> None:
    from registry.services.resolver import FileCache, FileRow

    cache = FileCache(max_entries=2)
    one, two, three = ((FileRow(f"f{i}", "0" * 64, i),) for i in range(3))
    cache.put((1, "a"), one)
    cache.put((2, "b"), two)
    assert cache.get((1, "a")) == one  # now the most recent
    cache.put((3, "c"), three)
    assert cache.get((2, "b")) is None and cache.get((1, "a")) == one and cache.get((3, "c")) == three
    assert cache.get((1, "other sha")) is None  # a reused id with another sha never hits


def test_a_saturated_database_pool_answers_503_with_retry_after(postgres_server, tmp_path) -> None:
    """Load beyond the connection pool waits, then gets 503 + Retry-After (never a 500), and service resumes."""
    url, name = _create_pg_database(postgres_server)
    reg = Registry(url, tmp_path / "data", db_pool_size=1, db_max_overflow=0, db_pool_timeout=0.2)
    try:
        held = reg.state.engine.connect()  # the pool's only connection
        try:
            busy = reg.client.get("/v1/models")
            assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
            assert busy.headers["content-type"].startswith("application/problem+json")
            assert "retry" in busy.json()["detail"]
        finally:
            held.close()
        assert reg.client.get("/v1/models").status_code == 200
        assert "503" in reg.client.get("/openapi.json").json()["paths"]["/v1/models"]["get"]["responses"]
    finally:
        reg.close()
        _drop_pg_database(postgres_server, name)


def test_a_burst_larger_than_the_pool_queues_instead_of_failing(postgres_server, tmp_path) -> None:
    """80 concurrent reads against 2 connections (and 40 worker threads): all answered, none 503 or 500.

    Without admission control, worker threads block waiting for a connection while the requests holding the
    connections wait for a worker thread, until the pool timeout fails them.
    """
    from concurrent.futures import ThreadPoolExecutor

    url, name = _create_pg_database(postgres_server)
    reg = Registry(url, tmp_path / "data", db_pool_size=2, db_max_overflow=0, db_pool_timeout=3)
    try:
        with ThreadPoolExecutor(max_workers=80) as pool:
            statuses = list(pool.map(lambda i: reg.client.get("/v1/models", params={"limit": 1 + i % 5}).status_code,
                                     range(240)))
        assert statuses == [200] * 240
    finally:
        reg.close()
        _drop_pg_database(postgres_server, name)


CODE_AND_HANDBOOK = ["python-code", "handbook:en"]


def test_a_job_can_search_a_recipe_and_ships_it_with_the_filters(registry, tiny_llama, tmp_path) -> None:
    from qfilters.artifact import QFilters
    from qfilters.validation.schema import ValidationReport
    from registry.db import session_scope
    from registry.models import Job

    client, headers = registry.client, registry.auth(registry.token("submit", "publish"))
    plain = client.post("/v1/jobs", json=_job(), headers=headers).json()
    overlapping = client.post("/v1/jobs", json=_job(search_recipe=True, eval_datasets=["handbook:en"]),
                              headers=headers)  # handbook:en twice
    assert "cannot be both" in _problem(overlapping, 422)["detail"]
    for bad in ({"passkey_trials": 257}, {"passkey_trials": -1}, {"passkey_trials": 2, "passkey_context": 8}):
        assert client.post("/v1/jobs", json=_job(**bad), headers=headers).status_code == 422, bad
    # found by a hostile probe: a context without trials was accepted, then silently dropped from the stored job
    alone = client.post("/v1/jobs", json=_job(passkey_context=128), headers=headers)
    assert "does nothing without passkey trials" in _problem(alone, 422)["detail"]
    recipe_only = client.post("/v1/jobs", json=_job(search_recipe=True, datasets=CODE_AND_HANDBOOK,
                                                    eval_datasets=["handbook:fr"], seed=1), headers=headers).json()
    job = client.post("/v1/jobs", json=_job(gates={**PASSING_GATES, "passkey_vs_streamingllm": -1.0},
                                            search_recipe=True, datasets=CODE_AND_HANDBOOK,
                                            eval_datasets=["handbook:fr"], passkey_trials=2,
                                            passkey_context=280),  # the tiny model's characters: intro + needle
                      headers=headers).json()
    with session_scope(registry.state.session_factory) as s:  # only jobs using a field need workers that know it
        assert s.get(Job, plain["id"]).spec_version == 1 and "search_recipe" not in s.get(Job, plain["id"]).request
        assert "passkey_trials" not in s.get(Job, plain["id"]).request
        assert s.get(Job, recipe_only["id"]).spec_version == 2
        assert "passkey_trials" not in s.get(Job, recipe_only["id"]).request
        assert s.get(Job, job["id"]).spec_version == 3 and s.get(Job, job["id"]).request["search_recipe"] is True
        assert s.get(Job, job["id"]).request["passkey_trials"] == 2
    assert "succeeded" in run_queued_jobs(registry, tiny_llama)
    done = client.get(f"/v1/jobs/{job['id']}").json()
    fs = client.get(f"/v1/filter-sets/{done['filter_set_id']}").json()
    report = ValidationReport.model_validate_json(client.get(fs["links"]["report_json"]).content)
    assert report.recipe is not None and [c.budget for c in report.recipe.chosen] == [24, 48]
    assert report.passkey is not None and report.passkey.trials == 2  # the retrieval test ran, its gate decided
    assert "passkey_vs_streamingllm" in {g.name for g in report.verdict.gates}
    out = tmp_path / "downloaded"
    out.mkdir()
    for f in fs["files"]:
        (out / f["name"]).write_bytes(client.get(f["url"]).content)
    loaded = QFilters.from_pretrained(out, expected_shape=tiny_llama.info.filter_shape)
    assert loaded.recipe is not None and loaded.recipe.to_dict()["by_budget"] == {
        str(c.budget): c.recipe for c in report.recipe.chosen}
    assert "Eviction recipe" in client.get(f"/v1/filter-sets/{fs['id']}/report.md").text


def test_job_spec_versions_old_rows_keep_their_meaning_new_ones_are_refused_by_old_workers() -> None:
    from registry.jobspec import CURRENT_VERSION, JobSpec, SpecError

    old = {"model": "tiny-llama", "datasets": ["a", "b"], "eval_datasets": ["c"], "tokens": 256, "seq_len": 128,
           "eval_seq_len": 128, "score_last": 64, "budgets": [48], "window": 64, "max_docs": 2}
    v1 = JobSpec.from_row(1, old)
    assert not v1.search_recipe and not v1.validation_settings().search_recipe
    v2 = JobSpec.from_row(2, {**old, "search_recipe": True, "recipe_docs": 3})
    settings = v2.validation_settings()
    assert settings.search_recipe and settings.recipe_docs == 3
    assert v2.validation_settings().passkey_trials == 0
    v3 = JobSpec.from_row(3, {**old, "passkey_trials": 12, "passkey_context": 96})
    assert (v3.validation_settings().passkey_trials, v3.validation_settings().passkey_context) == (12, 96)
    with pytest.raises(SpecError, match="upgrade the workers"):
        JobSpec.from_row(CURRENT_VERSION + 1, old)
