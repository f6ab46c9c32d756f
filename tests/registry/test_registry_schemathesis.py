"""Schemathesis over the registry's own OpenAPI spec, with no token and with a token of every scope (read, submit,
publish, admin; the scopes in between on SQLite, anonymous and admin on real PostgreSQL too): no server errors, every
response conforms to the spec (a documented status code, a documented content type, a body valid against the declared
schema), and no success a caller's scope does not allow (privilege escalation). Stateless (every operation alone) and
stateful (sequences that follow the spec's links: submit -> read / cancel / retry the job it created).

Each database is seeded once (module scope) by a real job run on the tiny random Llama, so a model, a filter set with
its files and reports, aliases, datasets, a job and audit events exist. Hooks send half of the generated path and query
parameters to those rows (id 1, the job's id, the ``latest`` alias, the model's name) instead of random values that
would only ever find 404s. Fuzzing cannot invent a job the service accepts (dataset specs, consistent sizes), so the
write flows that succeed (submit, idempotent resubmit, cancel, retry, alias move, publication, resolve) are also sent
as explicit schemathesis cases and validated with the same checks.

Runs are reproducible (fixed seed, derandomized, no example database) and bounded (``MAX_EXAMPLES`` per operation).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.python import asgi

from tests.registry.conftest import (
    PASSING_GATES,
    TINY_JOB,
    Registry,
    _create_pg_database,
    _drop_pg_database,
    run_queued_jobs,
)

MAX_EXAMPLES = 25  # per operation in the fuzzing phase; the coverage phase adds its boundary and invalid cases
SEED = 20240917
# 5xx; status codes, content types or bodies the spec does not declare.
CHECK_NAMES = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
               "response_schema_conformance"]


def _spec() -> dict:
    """The spec the app serves; building it touches no database, so collecting the tests needs none."""
    from fastapi.testclient import TestClient

    from registry.config import Settings
    from registry.main import create_app

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(database_url="sqlite://", data_dir=Path(tmp), run_jobs=False), run_jobs=False)
        return TestClient(app).get("/openapi.json").json()


schema = schemathesis.openapi.from_dict(_spec(), config=schemathesis.Config.from_dict({
    "seed": SEED,
    "generation": {
        "mode": "all",  # valid and invalid inputs
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,
        "database": "none",
        # The Authorization header is the test's to set (none, or the admin token), never a random bearer string.
        "with-security-parameters": False,
    },
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
}))


@dataclass
class Seeded:
    """A registry whose database holds one finished job and what it produced."""

    registry: Registry
    admin_token: str
    rows: dict[str, Any] = field(default_factory=dict)  # what names the seeded rows: ids, the job id, the model


# The seeded registry the generated cases go to (the hooks below read it while Hypothesis draws).
CURRENT: dict[str, Any] = {}


def _real_values(path: str, names: Any) -> dict[str, Any]:
    """Parameter values that name seeded rows, for the parameters this operation has."""
    rows = CURRENT
    values = {"job_id": rows.get("job_id"), "model_id": rows.get("model_id"),
              "filter_set_id": rows.get("filter_set_id"), "model": rows.get("hf_id"), "hf_id": rows.get("hf_id"),
              "revision": rows.get("revision"), "alias": "latest", "dataset": "python-code"}
    if "/aliases/" in path:
        values["name"] = "latest"
    return {k: v for k, v in values.items() if k in (names or {}) and v is not None}


@schema.hook
def flatmap_path_parameters(context, path_parameters):
    real = _real_values(context.operation.path, path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, **real}]) if real else st.just(path_parameters)


@schema.hook
def flatmap_query(context, query):
    real = _real_values(context.operation.path, query)
    return st.sampled_from([query, {**query, **real}]) if real else st.just(query)


# Jobs the service accepts (generated bodies almost never name valid datasets), with and without the fields that ask
# for the publish scope: so that submit, and the cancel / retry links that follow it, are exercised for real.
VALID_JOBS = [{**TINY_JOB, "seed": 11}, {**TINY_JOB, "seed": 12, "publish_to": "org/tiny-qf"},
              {**TINY_JOB, "seed": 13, "force_publish": True}]


@schema.hook
def flatmap_body(context, body):
    if context.operation.path == "/v1/jobs" and context.operation.method.upper() == "POST":
        return st.sampled_from([body, *(copy.deepcopy(job) for job in VALID_JOBS)])
    return st.just(body)


SCOPES = {"anonymous": set(), "read": {"read"}, "submit": {"submit", "read"}, "publish": {"publish", "read"},
          "admin": {"read", "submit", "publish", "admin"}}


def no_escalation(scope: str, token_name: str | None, case: Any, response: Any) -> None:
    """A success must be one the caller's scope allows: writes need their scope, publishing fields in a job body need
    publish, a job is cancelled or retried only by its submitter or an admin, the audit trail is admin-only."""
    if not 200 <= response.status_code < 300:
        return
    scopes, method, path = SCOPES[scope], case.operation.method.upper(), case.operation.path
    body = case.body if isinstance(case.body, dict) else {}
    needed = set()
    if (method, path) == ("POST", "/v1/jobs"):
        publishes = body.get("publish_to") is not None or body.get("force_publish")
        needed = {"submit"} | ({"publish"} if publishes else set())
    elif path.startswith("/v1/jobs/{job_id}/"):
        needed = {"submit"}
        assert "admin" in scopes or response.json()["created_by"] == token_name, f"{scope} changed a foreign job"
    elif method in ("PUT", "POST"):
        needed = {"publish"}
    elif path == "/v1/audit":
        needed = {"admin"}
    assert needed <= scopes, f"{method} {path} answered {response.status_code} to a {scope!r} caller"


def _seed(reg: Registry, lm) -> Seeded:
    """Run one passing job through the real pipeline: a model, a filter set, aliases, datasets, audit events."""
    admin = reg.token("admin", name="schemathesis-admin")
    body = {**copy.deepcopy(TINY_JOB), "gates": PASSING_GATES}
    response = reg.client.post("/v1/jobs", json=body, headers=reg.auth(admin))
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert run_queued_jobs(reg, lm) == ["succeeded"]
    job = reg.client.get(f"/v1/jobs/{job_id}").json()
    fs = reg.client.get(f"/v1/filter-sets/{job['filter_set_id']}").json()
    assert fs["verdict"] == "pass" and fs["aliases"] == ["latest"]
    rows = {"job_id": job_id, "model_id": fs["model_id"], "filter_set_id": fs["id"], "hf_id": fs["model"],
            "revision": fs["revision"]}
    return Seeded(reg, admin, rows)


@pytest.fixture(scope="module")
def seeded_registries(request, tiny_llama, tmp_path_factory) -> Iterator[Callable[[str], Seeded]]:
    """One seeded registry per backend for the whole module, made on first use (whatever order pytest picks)."""
    made: dict[str, Seeded] = {}
    pg_names: list[str] = []

    def get(backend: str) -> Seeded:
        if backend not in made:
            tmp = tmp_path_factory.mktemp(f"schemathesis-{backend}")
            if backend == "sqlite":
                url = f"sqlite:///{tmp / 'registry.sqlite3'}"
            else:
                url, name = _create_pg_database(request.getfixturevalue("postgres_server"))
                pg_names.append(name)
            reg = Registry(url, tmp / "data")
            try:
                made[backend] = _seed(reg, tiny_llama)
            except BaseException:
                reg.close()
                raise
        return made[backend]

    try:
        yield get
    finally:
        CURRENT.clear()
        for seeded in made.values():
            seeded.registry.close()
        for name in pg_names:
            _drop_pg_database(request.getfixturevalue("postgres_server"), name)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seeded_backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def seeded(seeded_backend: str, seeded_registries) -> Seeded:
    return seeded_registries(seeded_backend)


@dataclass
class Caller:
    seeded: Seeded
    headers: dict[str, str]
    session: asgi.ASGIClient

    scope: str = "admin"
    token_name: str | None = None

    def validate(self, case: schemathesis.Case) -> Any:
        """Send ``case`` to the app in-process with this caller's credentials; fail on any check or escalation."""
        load_all_checks()
        response = case.call_and_validate(session=self.session, headers=self.headers, app=self.seeded.registry.app,
                                          checks=CHECKS.get_by_names(CHECK_NAMES))
        no_escalation(self.scope, self.token_name, case, response)
        return response


def _token_for(seeded: Seeded, scope: str) -> tuple[dict[str, str], str | None]:
    if scope == "anonymous":
        return {}, None
    if scope == "admin":
        return seeded.registry.auth(seeded.admin_token), "schemathesis-admin"
    name = f"schemathesis-{scope}"
    if name not in seeded.rows:
        seeded.rows[name] = seeded.registry.token(scope, name=name)
    return seeded.registry.auth(seeded.rows[name]), name


@pytest.fixture(scope="module", params=list(SCOPES))
def caller(request, seeded: Seeded, seeded_backend: str) -> Iterator[Caller]:
    """Who calls: nobody, or a token of one scope (module scope: Hypothesis reruns the test body, never its
    fixtures). The scopes between anonymous and admin run on SQLite only, to keep the suite's time bounded."""
    if seeded_backend == "postgresql" and request.param not in ("anonymous", "admin"):
        pytest.skip("read / submit / publish callers run on SQLite; PostgreSQL runs anonymous and admin")
    CURRENT.clear()
    CURRENT.update({k: v for k, v in seeded.rows.items() if not k.startswith("schemathesis-")})
    headers, name = _token_for(seeded, request.param)
    # In-process transport to the app, not entered: the registry's test client already runs the app's lifespan.
    session = asgi.get_client(seeded.registry.app)
    yield Caller(seeded, headers, session, request.param, name)
    session.close()


def test_the_successful_write_flows_conform_too(seeded: Seeded) -> None:
    """Submit (201), resubmit with the same Idempotency-Key (200), cancel (200), retry (200), move an alias (200),
    request a publication (201) and resolve (200): responses fuzzing alone never reaches."""
    caller = Caller(seeded, seeded.registry.auth(seeded.admin_token), asgi.get_client(seeded.registry.app))
    rows = seeded.rows

    def send(method: str, path: str, status: int, **parts: Any) -> Any:
        response = caller.validate(schema[path][method].Case(**parts))
        assert response.status_code == status, response.text
        return response.json()

    job = {**copy.deepcopy(TINY_JOB), "gates": PASSING_GATES, "seed": 7}
    key = {"Idempotency-Key": "schemathesis-happy-path"}
    created = send("POST", "/v1/jobs", 201, body=job, headers=key, media_type="application/json")
    again = send("POST", "/v1/jobs", 200, body=job, headers=key, media_type="application/json")
    assert again["id"] == created["id"] and created["status"] == "queued"
    job_path = {"job_id": created["id"]}
    assert send("POST", "/v1/jobs/{job_id}/cancel", 200, path_parameters=job_path)["status"] == "cancelled"
    assert send("POST", "/v1/jobs/{job_id}/retry", 200, path_parameters=job_path)["status"] == "queued"
    send("POST", "/v1/jobs/{job_id}/cancel", 200, path_parameters=job_path)
    assert send("GET", "/v1/jobs/{job_id}", 200, path_parameters=job_path)["status"] == "cancelled"

    moved = send("PUT", "/v1/models/{model_id}/aliases/{name}", 200,
                 path_parameters={"model_id": rows["model_id"], "name": "stable"},
                 body={"filter_set_id": rows["filter_set_id"], "reason": "schemathesis"},
                 media_type="application/json")
    assert moved["filter_set_id"] == rows["filter_set_id"]
    send("GET", "/v1/models/{model_id}/aliases/{name}/history", 200,
         path_parameters={"model_id": rows["model_id"], "name": "stable"})
    send("POST", "/v1/filter-sets/{filter_set_id}/publications", 201,
         path_parameters={"filter_set_id": rows["filter_set_id"]}, body={"repo_id": "org/tiny-llama-qfilters"},
         media_type="application/json")
    resolved = send("GET", "/v1/resolve", 200, query={"model": rows["hf_id"], "revision": rows["revision"]})
    assert resolved["alias"] == "stable" and resolved["filter_set"]["id"] == rows["filter_set_id"]
    send("GET", "/v1/filter-sets/{filter_set_id}/lineage", 200,
         path_parameters={"filter_set_id": rows["filter_set_id"]})
    send("GET", "/v1/audit", 200, query={"target_type": "alias"})
    caller.session.close()


@schema.parametrize()
def test_every_response_conforms_to_the_openapi_spec(case, caller: Caller) -> None:
    if caller.scope in ("read", "submit", "publish") and case.method.upper() == "GET":
        pytest.skip("reads are public: anonymous and admin callers cover them")  # keeps the suite's time bounded
    assert "authorization" not in {k.lower() for k in case.headers or {}}, "only the test sets credentials"
    caller.validate(case)


STATEFUL_SCENARIOS = 10  # Hypothesis examples per scope, each a sequence of up to STATEFUL_STEPS linked calls
# (derandomized: a change to the API schema reshuffles the draws; raise this if a scope stops reaching a submit)
STATEFUL_STEPS = 5


@pytest.mark.parametrize("scope", list(SCOPES))
def test_stateful_sequences_conform_and_never_escalate(seeded_registries, scope: str) -> None:
    """Sequences that follow the spec's links (submit, then read / cancel / retry that job, and what the seeded rows
    lead to), for a caller of each scope, on SQLite: the same conformance checks, and no escalation at any step."""
    seeded = seeded_registries("sqlite")
    CURRENT.clear()
    CURRENT.update({k: v for k, v in seeded.rows.items() if not k.startswith("schemathesis-")})
    headers, name = _token_for(seeded, scope)
    session = asgi.get_client(seeded.registry.app)
    load_all_checks()
    checks = CHECKS.get_by_names(CHECK_NAMES)

    class Sequences(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"session": session, "headers": headers, "app": seeded.registry.app}

        def validate_response(self, response: Any, case: schemathesis.Case, additional_checks: Any = None,
                              **kwargs: Any) -> None:
            case.validate_response(response, checks=checks, transport_kwargs=kwargs)
            no_escalation(scope, name, case, response)
            calls.append((case.operation.method.upper(), case.operation.path, response.status_code))

    calls: list[tuple[str, str, int]] = []
    try:
        Sequences.run(settings=hypothesis.settings(
            max_examples=STATEFUL_SCENARIOS, stateful_step_count=STATEFUL_STEPS, deadline=None, derandomize=True,
            database=None, suppress_health_check=list(hypothesis.HealthCheck)))
    finally:
        session.close()
    created = ("POST", "/v1/jobs", 201) in calls
    assert created == ("submit" in SCOPES[scope]), sorted(set(calls))  # sequences did start from real jobs
