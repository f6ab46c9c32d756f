"""Follow-ups of the second hostile probe (after the Hub endpoint and worker pool landed), one test per finding:

- a submit-only token cannot loosen the publication gates (a passing verdict moves ``latest``, which resolve serves);
- embedded models have one revision: a job cannot register their filters under a revision that does not exist;
- with public reads off, downloads and report pages are never cacheable by shared caches;
- every answer says nosniff / no framing, and a report page renders sandboxed.

A third probe (README and curl only) and its review found the service's job counts open to anyone with public reads
off, and retries that skipped the size limits (the last two tests here); its other findings are cases of
``test_bad_submissions_get_a_422_that_says_what_to_fix``.
"""

from __future__ import annotations

from sqlalchemy import select

from tests.registry.conftest import Registry, run_queued_jobs
from tests.registry.conftest import job_body as _job

LOOSE = {"cross_dataset_cosine": -1, "split_half_min": -1, "gap_ratio_vs_streamingllm": 1e300, "gap_vs_knorm": 1e300}



def test_looser_gates_need_the_publish_scope_stricter_ones_do_not(registry) -> None:
    client = registry.client
    submitter = registry.auth(registry.token("submit"))
    for name, value in LOOSE.items():
        answer = client.post("/v1/jobs", json=_job(gates={name: value}), headers=submitter)
        assert answer.status_code == 403, (name, answer.text)
        assert "gates looser than the defaults" in answer.json()["detail"]
    assert client.get("/v1/jobs").json()["total"] == 0
    stricter = {"cross_dataset_cosine": 0.95, "split_half_min": 0.99, "gap_ratio_vs_streamingllm": 0.5,
                "gap_vs_knorm": -0.5}
    assert client.post("/v1/jobs", json=_job(gates=stricter), headers=submitter).status_code == 201
    publisher = registry.auth(registry.token("submit", "publish"))
    assert client.post("/v1/jobs", json=_job(gates=LOOSE), headers=publisher).status_code == 201


def test_a_submit_token_cannot_move_latest_with_its_own_gates(sqlite_registry, tiny_llama) -> None:
    from registry.models import Alias

    reg, client = sqlite_registry, sqlite_registry.client
    submitter = reg.auth(reg.token("submit"))
    assert client.post("/v1/jobs", json=_job(gates=LOOSE), headers=submitter).status_code == 403
    assert client.post("/v1/jobs", json=_job(), headers=submitter).status_code == 201
    run_queued_jobs(reg, tiny_llama)
    with reg.state.session_factory() as session:
        aliases = session.scalars(select(Alias)).all()
    # the tiny random model fails the default gates: nothing for resolve to serve
    assert [a.name for a in aliases] == []
    assert client.get("/v1/resolve", params={"model": "tiny-llama"}).status_code == 404


def test_embedded_models_refuse_a_revision_they_do_not_have(registry) -> None:
    client = registry.client
    submitter = registry.auth(registry.token("submit"))
    body = _job(model="smollm2", revision="v999")
    answer = client.post("/v1/jobs", json=body, headers=submitter)
    assert answer.status_code == 422 and "embedded model" in answer.text
    assert client.post("/v1/jobs", json=_job(model="smollm2", revision="refs/pr/1"), headers=submitter).status_code \
        == 422
    assert client.post("/v1/jobs", json=_job(model="smollm2", revision="main"), headers=submitter).status_code == 201


def test_private_reads_are_never_shared_cacheable(database_url, tmp_path, tiny_llama) -> None:
    for public in (True, False):
        reg = Registry(database_url, tmp_path / f"data-{public}", public_reads=public)
        try:
            headers = reg.auth(reg.token("submit", "read"))
            job = reg.client.post("/v1/jobs", json=_job(), headers=headers).json()
            run_queued_jobs(reg, tiny_llama)
            fs_id = reg.client.get(f"/v1/jobs/{job['id']}", headers=headers).json()["filter_set_id"]
            for path in (f"/v1/filter-sets/{fs_id}/files/model.safetensors", f"/filter-sets/{fs_id}/report"):
                answer = reg.client.get(path, headers=headers)
                assert answer.status_code == 200, answer.text
                cache = answer.headers["cache-control"]
                if public:
                    assert cache.startswith("public")
                else:
                    assert cache.startswith("private") and "public" not in cache
                    assert "authorization" in answer.headers["vary"].lower()
        finally:
            reg.close()


def test_every_answer_forbids_sniffing_and_framing_and_reports_render_sandboxed(sqlite_registry, tiny_llama) -> None:
    reg, client = sqlite_registry, sqlite_registry.client
    headers = reg.auth(reg.token("submit"))
    assert client.post("/v1/jobs", json=_job(), headers=headers).status_code == 201
    run_queued_jobs(reg, tiny_llama)
    (fs,) = client.get("/v1/filter-sets").json()["items"]
    answers = [client.get("/"), client.get("/v1/models"), client.get("/v1/jobs/" + "0" * 32),
               client.post("/v1/jobs", content=b"x" * 2_000_000, headers=headers),
               client.get(f"/filter-sets/{fs['id']}/report")]
    assert [a.status_code for a in answers] == [200, 200, 404, 413, 200]
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
    csp = answers[-1].headers["content-security-policy"]
    assert csp.startswith("sandbox") and "script-src" not in csp and "default-src 'none'" in csp


def test_nul_characters_in_queries_are_refused_not_sent_to_the_database(registry) -> None:
    # schemathesis found GET /v1/models?model_type=%00 answering 500 on PostgreSQL (text cannot hold NUL)
    client = registry.client
    for path in ("/v1/models?model_type=%00", "/v1/filter-sets?model=a%00b", "/v1/datasets?x%00=1",
                 "/v1/resolve?model=org/a%00"):
        answer = client.get(path)
        assert answer.status_code == 422, (path, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")
    assert client.get("/v1/models?model_type=llama").status_code == 200


def test_metrics_need_a_read_token_when_reads_are_private(tmp_path) -> None:
    for public in (True, False):
        reg = Registry(f"sqlite:///{tmp_path / f'metrics-{public}.sqlite3'}", tmp_path / f"data-{public}",
                       public_reads=public)
        try:
            anonymous = reg.client.get("/metrics")
            assert anonymous.status_code == (200 if public else 401), anonymous.text
            reader = reg.client.get("/metrics", headers=reg.auth(reg.token("read")))
            assert reader.status_code == 200 and "qfilters_jobs" in reader.text
        finally:
            reg.close()


def test_a_retry_is_held_to_the_size_limits_of_today(sqlite_registry) -> None:
    client = sqlite_registry.client
    headers = sqlite_registry.auth(sqlite_registry.token("submit"))
    job = client.post("/v1/jobs", json=_job(), headers=headers).json()  # 128-token sequences
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers).json()["status"] == "cancelled"
    sqlite_registry.state.settings.max_seq_len = 64  # the operator lowered the limit since
    refused = client.post(f"/v1/jobs/{job['id']}/retry", headers=headers)
    assert refused.status_code == 422 and "QFILTERS_MAX_SEQ_LEN" in refused.json()["detail"]
    assert client.get(f"/v1/jobs/{job['id']}", headers=headers).json()["status"] == "cancelled"  # left as it was
    sqlite_registry.state.settings.max_seq_len = 128
    assert client.post(f"/v1/jobs/{job['id']}/retry", headers=headers).json()["status"] == "queued"
