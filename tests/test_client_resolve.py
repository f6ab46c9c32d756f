"""``QFilters.from_pretrained(id)`` as a client: filter repos, base model ids (Hub search by tags, official naming),
revision pinning, offline from what was cached, a clear list of everything tried, and refusal of corrupted or wrong
files served by a Hub endpoint (acceptance 4 of issue 11). The Hub is ``tests/fake_hub.py`` over real HTTP, driven
through stock huggingface_hub (``hf_hub_download``, ``HfApi.list_models``). The registry path is in
``tests/registry/test_registry_client.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from safetensors.torch import save_file

from qfilters.artifact import QFilters
from qfilters.errors import ArtifactError, ArtifactNotFoundError, FiltersNotFoundError

L, H, D = 3, 2, 8
BASE = "acme/Base-7B"
COMMON_TAGS = ["q-filters", "kv-cache-compression", f"base_model:{BASE}"]
V1_COMMIT = "1111111111111111111111111111111111111111"


def make(seed: int, provenance: dict | None = None) -> QFilters:
    return QFilters(torch.randn(L, H, D, generator=torch.Generator().manual_seed(seed)),
                    provenance=provenance or {"seed": seed})


@pytest.fixture(autouse=True)
def client_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own qfilters client cache and no registry from the environment."""
    monkeypatch.setenv("QFILTERS_CACHE", str(tmp_path / "qfilters-cache"))
    monkeypatch.delenv("QFILTERS_REGISTRY_URL", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "qfilters-cache"


@pytest.fixture
def sets(tmp_path: Path) -> dict[str, tuple[QFilters, Path]]:
    out = {}
    for name, seed in (("pass-old", 1), ("fail-new", 2), ("other", 3), ("v1", 4), ("official", 5)):
        qf = make(seed)
        out[name] = (qf, qf.save_pretrained(tmp_path / "sets" / name))
    (out["official"][1] / "qfilters.json").unlink()  # the official repos carry no qfilters.json
    base = tmp_path / "sets" / "base-model"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                  "num_hidden_layers": L}))
    out["base"] = (None, base)  # type: ignore[assignment]
    return out


@pytest.fixture
def hub(sets: dict[str, tuple[QFilters, Path]]):
    with FakeHub() as fake:
        fake.add_dir(BASE, sets["base"][1])  # the base model itself: a transformers config, not filters
        fake.add_dir("team/base-7b-qfilters", sets["pass-old"][1], last_modified="2026-01-01T00:00:00.000Z",
                     tags=[*COMMON_TAGS, "qfilters-verdict:pass"])
        fake.add_dir("team/base-7b-qfilters", sets["v1"][1], commit=V1_COMMIT, refs=("v1",))
        fake.add_dir("lab/base-7b-experiment-qfilters", sets["fail-new"][1], last_modified="2026-06-01T00:00:00.000Z",
                     tags=[*COMMON_TAGS, "qfilters-verdict:fail"])
        fake.add_dir("team/other-qfilters", sets["other"][1],
                     tags=["q-filters", "base_model:acme/Other", "qfilters-verdict:pass"])
        fake.add_dir("nthngdy/Llama-3.1-8B-Instruct_qfilt", sets["official"][1])
        yield fake


def load(identifier: str, hub: FakeHub, cache: Path, **kwargs) -> QFilters:
    return QFilters.from_pretrained(identifier, endpoint=hub.url, cache_dir=cache, **kwargs)


# ---------------------------------------------------------------------------------------------- resolution


def test_base_model_id_resolves_by_tags_preferring_a_passing_verdict_then_the_newest(
    sets: dict, hub: FakeHub, tmp_path: Path
) -> None:
    cache = tmp_path / "hf"
    got = load(BASE, hub, cache)
    # the passing repo wins over a newer failing one
    assert torch.equal(got.filters, sets["pass-old"][0].filters) and got.provenance == {"seed": 1}
    assert got.source["kind"] == "hub-search" and got.source["repo_id"] == "team/base-7b-qfilters"
    assert got.source["base_model"] == BASE and got.source["verdict"] == "pass"
    assert ("GET", "/api/models") in hub.requests

    # among passing repos the newest wins
    hub.tags["lab/base-7b-experiment-qfilters"] = [*COMMON_TAGS, "qfilters-verdict:pass"]
    newest = load(BASE, hub, cache)
    assert torch.equal(newest.filters, sets["fail-new"][0].filters)
    assert newest.source["repo_id"] == "lab/base-7b-experiment-qfilters"

    # a filter repo id is loaded as such, not searched for
    searches = hub.requests.count(("GET", "/api/models"))
    direct = load("team/other-qfilters", hub, cache)
    assert torch.equal(direct.filters, sets["other"][0].filters) and direct.source["kind"] == "repo"
    assert hub.requests.count(("GET", "/api/models")) == searches


def test_offline_a_base_model_id_resolves_to_what_was_last_fetched(sets: dict, hub: FakeHub, tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    online = load(BASE, hub, cache)
    seen = len(hub.requests)
    offline = load(BASE, hub, cache, local_files_only=True)
    assert torch.equal(offline.filters, online.filters) and offline.source["repo_id"] == "team/base-7b-qfilters"
    assert offline.source["commit"] == online.source["commit"]
    assert len(hub.requests) == seen  # no network at all
    # another HF cache has nothing recorded: a clear offline error, not someone else's filters
    with pytest.raises(FiltersNotFoundError) as info:
        load(BASE, hub, tmp_path / "other-hf", local_files_only=True)
    assert "no earlier search result is recorded" in str(info.value)


_CHILD = textwrap.dedent(
    """
    import json, sys
    from qfilters import QFilters
    try:
        qf = QFilters.from_pretrained(sys.argv[1])
        print(json.dumps({"ok": qf.filters.tolist(), "source": qf.source}))
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
    """
)


def _child(identifier: str, **env: str) -> dict:
    ambient = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_TOKEN", "QFILTERS_REGISTRY_URL")
    full = {k: v for k, v in os.environ.items() if k not in ambient}
    full.update(env)
    proc = subprocess.run([sys.executable, "-c", _CHILD, identifier], capture_output=True, text=True, env=full,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hf_hub_offline_in_a_fresh_process(sets: dict, hub: FakeHub, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}
    online = _child(BASE, **env)
    assert online.get("ok") == sets["pass-old"][0].filters.tolist(), online
    seen = len(hub.requests)
    offline = _child(BASE, **env, HF_HUB_OFFLINE="1")
    assert offline.get("ok") == online["ok"] and offline["source"]["kind"] == "hub-search", offline
    official = _child("meta-llama/Meta-Llama-3.1-8B-Instruct", **env, HF_HUB_OFFLINE="1")
    assert official.get("error") == "FiltersNotFoundError" and "HF_HUB_OFFLINE" in official["message"]
    assert len(hub.requests) == seen


def test_official_naming_is_the_last_resort(sets: dict, hub: FakeHub, tmp_path: Path) -> None:
    # kvpress's rule: the last part of the id, Meta-Llama -> Llama, + _qfilt, under nthngdy/
    got = load("meta-llama/Meta-Llama-3.1-8B-Instruct", hub, tmp_path / "hf")
    assert torch.equal(got.filters, sets["official"][0].filters) and got.provenance == {}
    assert got.source == {"kind": "official", "repo_id": "nthngdy/Llama-3.1-8B-Instruct_qfilt",
                          "endpoint": hub.url, "revision": None, "commit": got.source["commit"],
                          "base_model": "meta-llama/Meta-Llama-3.1-8B-Instruct"}
    # loaded strictly even without qfilters.json: a misnamed tensor there is refused, never random filters
    bad = sets["official"][1] / "model.safetensors"
    save_file({"filters": torch.randn(L, H, D)}, str(bad))
    hub.add_dir("nthngdy/Llama-3.1-8B-Instruct_qfilt", sets["official"][1], commit="2" * 40, refs=("main",))
    with pytest.raises(ArtifactError, match="no tensor named 'q_filters'"):
        load("meta-llama/Meta-Llama-3.1-8B-Instruct", hub, tmp_path / "hf")


def test_revision_pins_the_filter_repo(sets: dict, hub: FakeHub, tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    latest = load("team/base-7b-qfilters", hub, cache)
    by_tag = load("team/base-7b-qfilters", hub, cache, revision="v1")
    by_commit = load("team/base-7b-qfilters", hub, cache, revision=V1_COMMIT)
    assert torch.equal(latest.filters, sets["pass-old"][0].filters)
    assert torch.equal(by_tag.filters, sets["v1"][0].filters) and torch.equal(by_commit.filters, by_tag.filters)
    assert by_tag.source["commit"] == V1_COMMIT
    # a base model id with a revision pins the repo it resolves to
    pinned = load(BASE, hub, cache, revision="v1")
    assert pinned.source["repo_id"] == "team/base-7b-qfilters" and torch.equal(pinned.filters, by_tag.filters)
    # offline, a pinned revision still comes from the cache
    assert torch.equal(load("team/base-7b-qfilters", hub, cache, revision="v1", local_files_only=True).filters,
                       by_tag.filters)


def test_nothing_found_names_every_place_tried(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(FiltersNotFoundError) as info:
        load("nobody/Unknown-1B", hub, tmp_path / "hf", token="hf_secret_do_not_log")
    error = info.value
    assert isinstance(error, FileNotFoundError) and isinstance(error, LookupError)
    assert isinstance(error, ArtifactNotFoundError)
    message = str(error)
    for place in ("filter repo nobody/Unknown-1B", "registry: none configured", "QFILTERS_REGISTRY_URL",
                  "Hub search", "base_model:nobody/Unknown-1B", "no repo found", "nthngdy/Unknown-1B_qfilt"):
        assert place in message, place
    assert len(error.tried) == 4 and "hf_secret_do_not_log" not in message
    assert error.__cause__ is not None
    # an id the Hub's rules reject is a clear error too, online and offline
    for offline in (False, True):
        with pytest.raises(ArtifactNotFoundError, match="valid"):
            load("bad--name/x", hub, tmp_path / "hf", local_files_only=offline)
    # a model repo that exists but has no filters anywhere says so
    hub.tags.clear()
    with pytest.raises(FiltersNotFoundError, match="it is a model repo"):
        load(BASE, hub, tmp_path / "hf")


# ---------------------------------------------------------------------------------------------- acceptance 4


@pytest.mark.parametrize("filename", ["config.json", "model.safetensors", "qfilters.json"])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_byte_flipped_in_transit_is_refused(sets: dict, hub: FakeHub, tmp_path: Path, filename: str,
                                              where: str) -> None:
    size = len(hub.repos["team/base-7b-qfilters"][filename])
    hub.flip_in_transit[("team/base-7b-qfilters", filename)] = {"start": 0, "middle": size // 2, "end": size - 1}[where]
    for identifier in ("team/base-7b-qfilters", BASE):
        with pytest.raises(ArtifactError) as info:
            load(identifier, hub, tmp_path / f"hf-{identifier.replace('/', '-')}")
        assert "differs from the sha256" in str(info.value) and filename in info.value.path


def test_git_sha1_etags_of_small_hub_files_are_checked_too(sets: dict, hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub.utils.sha import git_hash

    hub.git_etags = True
    loaded = load("team/base-7b-qfilters", hub, tmp_path / "hf")
    blob = Path(os.path.realpath(next((tmp_path / "hf").rglob("snapshots/*/config.json"))))
    assert blob.name == git_hash(blob.read_bytes())  # the cache names the blob after the git sha1 ETag
    assert torch.equal(loaded.filters, sets["pass-old"][0].filters)
    hub.flip_in_transit[("team/base-7b-qfilters", "config.json")] = 3
    with pytest.raises(ArtifactError, match="differs from the git sha1"):
        load("team/base-7b-qfilters", hub, tmp_path / "hf2")


def test_a_byte_flipped_on_the_server_is_refused(sets: dict, hub: FakeHub, tmp_path: Path) -> None:
    files = hub.repos["team/base-7b-qfilters"]
    # the weights: caught by qfilters.json's sha256 wherever the byte is
    for offset in (8, len(files["model.safetensors"]) // 2, len(files["model.safetensors"]) - 1):
        original = files["model.safetensors"]
        files["model.safetensors"] = original[:offset] + bytes([original[offset] ^ 0x01]) + original[offset + 1:]
        with pytest.raises(ArtifactError, match="does not match tensor_sha256|not a readable safetensors"):
            load(BASE, hub, tmp_path / f"hf-{offset}")
        files["model.safetensors"] = original
    # config.json: any change breaks the JSON, a key, or the shape agreement with the tensor and qfilters.json
    config = files["config.json"]
    for offset in range(len(config)):
        files["config.json"] = config[:offset] + bytes([config[offset] ^ 0x01]) + config[offset + 1:]
        with pytest.raises(ArtifactError):
            QFilters._load_files(*_materialise(files, tmp_path / f"cfg-{offset}"), expected_shape=None)
    files["config.json"] = config


def _materialise(files: dict[str, bytes], directory: Path) -> tuple[dict, dict]:
    directory.mkdir()
    paths = {}
    for name, data in files.items():
        (directory / name).write_bytes(data)
        paths[name] = directory / name
    return paths, {name: str(p) for name, p in paths.items()}


@pytest.mark.parametrize("variant", ["misnamed tensor", "wrong shape", "wrong rank", "model checkpoint"])
@pytest.mark.parametrize("with_metadata", [True, False], ids=["ours", "third-party"])
def test_a_repo_with_a_wrong_tensor_is_refused_never_random(
    sets: dict, hub: FakeHub, tmp_path: Path, variant: str, with_metadata: bool
) -> None:
    art = tmp_path / "bad"
    make(9).save_pretrained(art)
    weights = str(art / "model.safetensors")
    if variant == "misnamed tensor":
        save_file({"q_filter": torch.randn(L, H, D)}, weights)
    elif variant == "wrong shape":
        save_file({"q_filters": torch.randn(L, H + 1, D)}, weights)
    elif variant == "wrong rank":
        save_file({"q_filters": torch.randn(L * H * D)}, weights)
    else:
        save_file({"model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4)}, weights)
    if with_metadata:  # recompute the sha so the structural check, not the hash, is what fires
        meta = json.loads((art / "qfilters.json").read_text())
        meta["tensor_sha256"] = __import__("hashlib").sha256((art / "model.safetensors").read_bytes()).hexdigest()
        (art / "qfilters.json").write_text(json.dumps(meta))
    else:
        (art / "qfilters.json").unlink()
    hub.add_dir("mallory/bad-qfilters", art, tags=["q-filters", "base_model:acme/Victim", "qfilters-verdict:pass"])
    for identifier in ("mallory/bad-qfilters", "acme/Victim"):
        with pytest.raises(ArtifactError) as info:
            load(identifier, hub, tmp_path / "hf")
        assert "hf://mallory/bad-qfilters/model.safetensors" == info.value.path


def test_a_cached_file_changed_after_download_is_refused(sets: dict, hub: FakeHub, tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    load("nthngdy/Llama-3.1-8B-Instruct_qfilt", hub, cache)  # no qfilters.json: only the served hash protects it
    blob = Path(os.path.realpath(next(cache.rglob("snapshots/*/model.safetensors"))))
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="changed in the cache"):
        load("nthngdy/Llama-3.1-8B-Instruct_qfilt", hub, cache, local_files_only=True)


def test_a_hash_remembered_for_a_warm_load_does_not_hide_a_later_change(hub: FakeHub, tmp_path: Path,
                                                                       client_cache: Path) -> None:
    import time

    from qfilters import verified

    cache = tmp_path / "hf"
    load("team/base-7b-qfilters", hub, cache)
    assert not (client_cache / "client" / "verified").exists()  # just written: too fresh to be remembered
    time.sleep(verified.RACY_S + 0.2)
    load("team/base-7b-qfilters", hub, cache, local_files_only=True)
    assert len(list((client_cache / "client" / "verified").iterdir())) == 1  # the weights' hash is remembered
    blob = Path(os.path.realpath(next(cache.rglob("snapshots/*/model.safetensors"))))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))  # same size, same inode: only the times change
    with pytest.raises(ArtifactError, match="changed in the cache"):
        load("team/base-7b-qfilters", hub, cache, local_files_only=True)
