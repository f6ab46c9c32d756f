"""Property: no job body, whatever combination of fields it holds, escalates a token's scope or names the server's disk.

Hypothesis draws job bodies (any subset of fields over and around the valid values: embedded and Hub models, local
paths in every syntax the spec parser knows, ``publish_to`` / ``force_publish``, junk fields and sizes) and a caller
of every scope (none, read, submit, publish, submit+publish, admin), with a ``notes/`` directory of secrets in the
server's working directory. Every answer is checked: never a 5xx; a job is created only for a token with the
``submit`` scope, and with ``publish`` whenever the body asks to publish; never for a body that names a local path or
a model the service cannot take from the Hub; and nothing of the secrets reaches the database.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from tests.registry.conftest import TINY_JOB

MAX_EXAMPLES = 150
SECRET = "private notes of the server"
CALLERS = {"anonymous": (), "read": ("read",), "submit": ("submit",), "publish": ("publish",),
           "submit+publish": ("submit", "publish"), "admin": ("admin",)}
IMPLIED = {"read": {"read"}, "submit": {"submit", "read"}, "publish": {"publish", "read"},
           "admin": {"read", "submit", "publish", "admin"}}
GOOD_SPECS = ["python-code", "handbook:en", "austen", "fortunes:en", "python-docs", "jargon", "bible"]
LOCAL_SPECS = ["hf:notes:train", "hf:notes::train:text", "hf:json:train", "notes", "./notes", "notes/a.jsonl",
               "notes#text", "file:notes", "file:/etc/hosts", "/etc/hosts", "~", "~/notes", "../notes", "..", "*",
               "notes/*.jsonl"]
HUB_SPECS = ["hf:wikitext:wikitext-2-raw-v1:test:text", "hf:org/private:train"]  # not allow-listed, Hub offline
GOOD_MODELS = ["tiny-llama", "smollm2", "qfilters-test/model"]
BAD_MODELS = ["notes", "./notes", "/etc", "~", "org/unknown", "../notes", "notes/config.json"]


def _specs(min_size: int, max_size: int) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(GOOD_SPECS + LOCAL_SPECS + HUB_SPECS) | st.text(max_size=12),
                    min_size=min_size, max_size=max_size)


# Each field: mostly values the service could accept (so that scopes and sources decide), else hostile or junk.
FIELDS = {
    "model": st.sampled_from(GOOD_MODELS) | st.sampled_from(BAD_MODELS) | st.text(max_size=20),
    "revision": st.sampled_from(["main", "v1.0", "../main", "/etc"]) | st.none(),
    "datasets": st.lists(st.sampled_from(GOOD_SPECS), min_size=2, max_size=3, unique=True) | _specs(0, 4),
    "eval_datasets": st.lists(st.sampled_from(GOOD_SPECS), min_size=1, max_size=2, unique=True) | _specs(0, 3),
    "publish_to": st.sampled_from(["victim-org/filters", "org/tiny-qf"]) | st.sampled_from(["org/../x", "notes"]),
    "force_publish": st.booleans(),
    "tokens": st.integers(256, 4096) | st.integers(0, 100_000),
    "seed": st.integers(0, 10) | st.integers(-1, 10),
    "gates": st.just({}) | st.sampled_from([{"cross_dataset_cosine": 1.01}, {"no_such_gate": 1}]),
    "surprise": st.just("extra field"),
}
bodies = st.tuples(
    st.sets(st.sampled_from(sorted(FIELDS)), max_size=4),  # the fields this body changes, and one it may drop
    st.just(set()) | st.just(set()) | st.sets(st.sampled_from(["model", "datasets", "eval_datasets"]), max_size=1),
    st.data(),
)


def _body(changed: set[str], dropped: set[str], data: st.DataObject) -> dict:
    body = copy.deepcopy(TINY_JOB)
    for name in sorted(changed):
        body[name] = data.draw(FIELDS[name], label=name)
    for name in dropped:
        body.pop(name, None)
    return body


def _refused_source(body: dict) -> bool:
    specs = [s for key in ("datasets", "eval_datasets") for s in body.get(key) or [] if isinstance(s, str)]
    return any(s.strip() in LOCAL_SPECS + HUB_SPECS for s in specs) or body.get("model") in BAD_MODELS


@pytest.fixture
def world(sqlite_registry, tmp_path, monkeypatch):
    cwd = tmp_path / "server-cwd"
    (cwd / "notes").mkdir(parents=True)
    (cwd / "notes" / "a.jsonl").write_text(json.dumps({"text": SECRET}) + "\n")
    (cwd / "notes" / "config.json").write_text("{}")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reg = sqlite_registry
    tokens = {name: reg.token(*scopes) if scopes else None for name, scopes in CALLERS.items()}
    return reg, tokens


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(drawn=bodies, caller=st.sampled_from(sorted(CALLERS)))
def test_no_job_body_escalates_a_scope_or_reaches_the_server_disk(world, drawn, caller: str) -> None:
    reg, tokens = world
    body = _body(*drawn)
    headers = reg.auth(tokens[caller]) if tokens[caller] else {}
    response = reg.client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code < 500, response.text
    event(f"{caller}: {response.status_code}")
    scopes = set().union(*(IMPLIED[s] for s in CALLERS[caller]))
    if response.status_code in (200, 201):
        assert "submit" in scopes, (caller, body)
        if body.get("publish_to") is not None or body.get("force_publish"):
            assert "publish" in scopes, (caller, body)
        assert not _refused_source(body), body
        assert not set(body["datasets"]) & set(body["eval_datasets"]), body  # evaluation text is held out
        stored = reg.client.get(response.headers["location"]).json()["request"]
        assert not _refused_source(stored)
    else:
        assert response.headers["content-type"].startswith("application/problem+json")
        if caller == "anonymous":
            assert response.status_code in (401, 422)  # body validation may come first: either way, nothing written
    with reg.state.session_factory() as session:
        dump = "\n".join(str(row) for table in ("jobs", "datasets", "models")
                         for row in session.execute(text(f"SELECT * FROM {table}")))
    assert SECRET not in dump and str(Path.cwd()) not in dump
