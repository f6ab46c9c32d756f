"""QFilters artifacts: format, scoring convention, strict loading, atomic saving, Hub code path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from safetensors.torch import save_file

from qfilters.artifact import QFilters, sha256_file
from qfilters.errors import ArtifactError, ArtifactNotFoundError, ShapeMismatchError
from qfilters.scorers import QFilterScorer

L, H, D = 3, 2, 8


def make_filters(seed: int = 0, provenance: dict | None = None) -> QFilters:
    gen = torch.Generator().manual_seed(seed)
    return QFilters(torch.randn(L, H, D, generator=gen), provenance=provenance)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[QFilters, Path]:
    qf = make_filters(provenance={"model": "tiny", "tokens": 123, "nested": {"a": [1, 2]}})
    return qf, qf.save_pretrained(tmp_path / "art")


# ---------------------------------------------------------------------------------------------- format, round trip


def test_round_trip_keeps_tensor_provenance_and_records_sha(saved: tuple[QFilters, Path]) -> None:
    qf, art = saved
    assert sorted(p.name for p in art.iterdir()) == ["config.json", "model.safetensors", "qfilters.json"]
    assert json.loads((art / "config.json").read_text()) == {"kv_head_dim": D, "num_kv_heads": H, "num_layers": L}
    meta = json.loads((art / "qfilters.json").read_text())
    assert meta["tensor_sha256"] == sha256_file(art / "model.safetensors")
    assert meta["format_version"] == 1 and meta["library_version"] and meta["tensor_shape"] == [L, H, D]

    loaded = QFilters.from_pretrained(art)
    assert loaded.filters.dtype == torch.float32
    assert torch.equal(loaded.filters, qf.filters)
    assert loaded.provenance == qf.provenance
    assert loaded.artifact_info["tensor_sha256"] == meta["tensor_sha256"]
    assert (loaded.num_layers, loaded.num_kv_heads, loaded.head_dim) == (L, H, D)
    # str paths and expected_shape that agrees are fine too
    assert torch.equal(QFilters.from_pretrained(str(art), expected_shape=(L, H, D)).filters, qf.filters)


def test_safetensors_holds_exactly_one_float32_tensor(saved: tuple[QFilters, Path]) -> None:
    from safetensors import safe_open

    _, art = saved
    with safe_open(str(art / "model.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["q_filters"]
        assert f.get_slice("q_filters").get_dtype() == "F32"
        assert f.metadata() is None  # nothing time- or machine-dependent in the header


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = make_filters(provenance={"x": 1}).save_pretrained(tmp_path / "a")
    b = make_filters(provenance={"x": 1}).save_pretrained(tmp_path / "deeper" / "b")
    for name in ("model.safetensors", "config.json", "qfilters.json"):
        assert sha256_file(a / name) == sha256_file(b / name), name


def test_init_normalises_and_validates() -> None:
    half = QFilters(torch.ones(1, 1, 2, dtype=torch.float16))
    assert half.filters.dtype == torch.float32
    with pytest.raises(ShapeMismatchError, match="3-D"):
        QFilters(torch.ones(2, 2))
    with pytest.raises(ArtifactError, match="non-finite"):
        QFilters(torch.tensor([[[1.0, float("nan")]]]))
    with pytest.raises(ArtifactError, match="provenance must be a dict"):
        QFilters(torch.ones(1, 1, 2), provenance=["not", "a", "dict"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- GQA, sign, scoring


def test_from_query_filters_gqa_mean_and_public_sign() -> None:
    # 1 layer, 4 query heads -> 2 KV heads (repeat_kv order: q0,q1 -> kv0; q2,q3 -> kv1), head_dim 2.
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 1.0], [1.0, 3.0]]])
    qf = QFilters.from_query_filters(q, num_kv_heads=2, provenance={"p": 1})
    expected = -torch.tensor([[[0.5, 0.5], [2.0, 2.0]]])  # -(mean), deliberately not renormalised
    assert torch.equal(qf.filters, expected)
    assert qf.provenance == {"p": 1}
    with pytest.raises(ShapeMismatchError, match="multiple"):
        QFilters.from_query_filters(torch.ones(1, 3, 2), num_kv_heads=2)


def _key_scores(qf: QFilters, keys: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """How the cache scores an artifact's keys: its ``QFilterScorer`` (positions do not matter to Q-Filters)."""
    return QFilterScorer(qf).score(keys, layer_idx, torch.arange(keys.shape[2]))


def test_key_scores_rank_keys_along_the_queries_first() -> None:
    # Queries point along +x; the public filter is -x; kvpress scores -(f . k) = +x-component of k.
    qf = QFilters.from_query_filters(torch.tensor([[[1.0, 0.0]]]), num_kv_heads=1)
    keys = torch.tensor([[[[2.0, 0.0], [-1.0, 5.0], [0.5, -3.0]]]])  # [B=1, H=1, T=3, D=2]
    scores = _key_scores(qf, keys, layer_idx=0)
    assert scores.shape == (1, 1, 3)
    assert torch.equal(scores, torch.tensor([[[2.0, -1.0, 0.5]]]))
    assert scores.topk(2, dim=-1).indices.tolist() == [[[0, 2]]]  # higher = kept


def test_key_scores_match_the_kvpress_expression_and_dtype() -> None:
    qf = make_filters(seed=3)
    keys = torch.randn(2, H, 17, D, dtype=torch.bfloat16)
    f = qf.filters[1].to(torch.bfloat16)[None, :, None]
    # computed in the keys' dtype as kvpress does, then widened exactly to float32
    assert torch.equal(_key_scores(qf, keys, 1), (-(f * keys).sum(dim=-1)).float())
    with pytest.raises(ShapeMismatchError):
        _key_scores(qf, torch.randn(1, H + 1, 4, D), 0)
    with pytest.raises(ShapeMismatchError):
        _key_scores(qf, torch.randn(1, H, 4, D), L)


# ---------------------------------------------------------------------------------------------- strict loading


def _third_party(art: Path) -> Path:
    """Drop qfilters.json so the structural checks (not the sha256 check) are what fires, as for foreign repos."""
    (art / "qfilters.json").unlink()
    return art


def _rewrite_config(art: Path, config: object) -> None:
    (art / "config.json").write_text(json.dumps(config))


def _corrupt(variant: str, art: Path) -> None:
    good = torch.randn(L, H, D)
    cfg = {"kv_head_dim": D, "num_kv_heads": H, "num_layers": L}
    weights = str(art / "model.safetensors")
    if variant == "misnamed tensor":
        save_file({"filters": good}, weights)
    elif variant == "extra tensor":
        save_file({"q_filters": good, "bias": torch.zeros(3)}, weights)
    elif variant == "shape vs config":
        save_file({"q_filters": torch.randn(L + 1, H, D)}, weights)
    elif variant == "rank":
        save_file({"q_filters": torch.randn(L * H, D)}, weights)
    elif variant == "float16":
        save_file({"q_filters": good.half()}, weights)
    elif variant == "nan":
        good[1, 1, 3] = float("nan")
        save_file({"q_filters": good}, weights)
    elif variant == "inf":
        good[0, 0, 0] = float("-inf")
        save_file({"q_filters": good}, weights)
    elif variant == "not safetensors":
        Path(weights).write_bytes(b"this is not a safetensors file")
    elif variant == "missing weights":
        Path(weights).unlink()
    elif variant == "missing config":
        (art / "config.json").unlink()
    elif variant == "config missing key":
        del cfg["num_kv_heads"]
        _rewrite_config(art, cfg)
    elif variant == "config extra key":
        _rewrite_config(art, {**cfg, "model_type": "llama"})
    elif variant == "config float value":
        _rewrite_config(art, {**cfg, "num_layers": 3.0})
    elif variant == "config bool value":
        _rewrite_config(art, {**cfg, "num_kv_heads": True})
    elif variant == "config not json":
        (art / "config.json").write_text("{kv_head_dim: 8")
    elif variant == "config not object":
        _rewrite_config(art, [L, H, D])
    else:  # pragma: no cover
        raise AssertionError(variant)


STRICT_CASES = [
    # variant, file named in the message, words the message must contain
    ("misnamed tensor", "model.safetensors", "no tensor named 'q_filters'"),
    ("extra tensor", "model.safetensors", "unexpected tensor(s) ['bias']"),
    ("shape vs config", "model.safetensors", "declares"),
    ("rank", "model.safetensors", "rank 2"),
    ("float16", "model.safetensors", "F16"),
    ("nan", "model.safetensors", "non-finite"),
    ("inf", "model.safetensors", "non-finite"),
    ("not safetensors", "model.safetensors", "not a readable safetensors"),
    ("missing weights", "model.safetensors", "is missing"),
    ("missing config", "config.json", "is missing"),
    ("config missing key", "config.json", "missing key(s) ['num_kv_heads']"),
    ("config extra key", "config.json", "unexpected key(s) ['model_type']"),
    ("config float value", "config.json", "'num_layers' must be a positive int"),
    ("config bool value", "config.json", "'num_kv_heads' must be a positive int"),
    ("config not json", "config.json", "cannot be read as JSON"),
    ("config not object", "config.json", "JSON object"),
]


@pytest.mark.parametrize(("variant", "filename", "words"), STRICT_CASES, ids=[c[0] for c in STRICT_CASES])
def test_strict_loading_refuses_corrupted_artifacts(
    saved: tuple[QFilters, Path], variant: str, filename: str, words: str
) -> None:
    art = _third_party(saved[1])
    _corrupt(variant, art)
    with pytest.raises(ArtifactError) as info:
        QFilters.from_pretrained(art)
    message = str(info.value)
    assert info.value.path == str(art / filename)
    assert message.startswith(str(art / filename))
    assert words in message


def test_tampered_weights_fail_the_sha256_check(saved: tuple[QFilters, Path]) -> None:
    _, art = saved
    weights = art / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # still a valid safetensors file with finite values: only the hash can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match tensor_sha256") as info:
        QFilters.from_pretrained(art)
    assert info.value.path == str(weights)


def test_metadata_from_a_newer_format_is_refused(saved: tuple[QFilters, Path]) -> None:
    _, art = saved
    meta = json.loads((art / "qfilters.json").read_text())
    meta["format_version"] = 99
    (art / "qfilters.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="upgrade qfilters") as info:
        QFilters.from_pretrained(art)
    assert info.value.path.endswith("qfilters.json")


def test_expected_shape_mismatch_is_a_shape_mismatch_error(saved: tuple[QFilters, Path]) -> None:
    with pytest.raises(ShapeMismatchError, match=r"\[3, 2, 8\].*\[3, 4, 8\]"):
        QFilters.from_pretrained(saved[1], expected_shape=(L, 2 * H, D))


def test_missing_directory_and_file_path(tmp_path: Path, saved: tuple[QFilters, Path]) -> None:
    with pytest.raises(ArtifactNotFoundError, match="no such directory"):
        QFilters.from_pretrained(tmp_path / "nope")
    with pytest.raises(ArtifactNotFoundError, match="no such directory"):
        QFilters.from_pretrained("./nope/not/here")
    with pytest.raises(ArtifactError, match="is a file"):
        QFilters.from_pretrained(saved[1] / "model.safetensors")


def test_third_party_artifact_loads_with_empty_provenance(saved: tuple[QFilters, Path]) -> None:
    qf, art = saved
    _third_party(art)
    (art / "README.md").write_text("model card")  # PyTorchModelHubMixin writes one; it is ignored
    loaded = QFilters.from_pretrained(art)
    assert loaded.provenance == {} and loaded.artifact_info == {}
    assert torch.equal(loaded.filters, qf.filters)


# ---------------------------------------------------------------------------------------------- atomic saving


def test_failed_save_leaves_no_target_and_no_litter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def boom(*args: object, **kwargs: object) -> None:
        Path(args[1]).write_bytes(b"partial")  # a half-written file, then the disk "fills up"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="No space left"):
        make_filters().save_pretrained(tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_artifact(
    saved: tuple[QFilters, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    qf, art = saved
    before = {p.name: p.read_bytes() for p in art.iterdir()}

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated crash mid-save")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        make_filters(seed=9).save_pretrained(art)
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before
    assert sorted(p.name for p in art.parent.iterdir()) == ["art"]
    monkeypatch.undo()
    assert torch.equal(QFilters.from_pretrained(art).filters, qf.filters)


def test_saved_files_get_ordinary_permissions(tmp_path: Path) -> None:
    """Users share artifacts: every file is 0644 minus the umask (safetensors alone would make the weights 0600)."""
    import stat

    old = os.umask(0o022)
    try:
        art = make_filters().save_pretrained(tmp_path / "art")
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in art.iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644, "qfilters.json": 0o644}
    assert stat.S_IMODE(art.stat().st_mode) == 0o755


def test_overwrite_replaces_artifact_and_keeps_foreign_files(saved: tuple[QFilters, Path]) -> None:
    _, art = saved
    (art / "README.md").write_text("card")
    newer = make_filters(seed=5, provenance={"v": 2})
    with pytest.raises(ArtifactError, match="overwrite=True"):
        newer.save_pretrained(art, overwrite=False)
    assert newer.save_pretrained(art) == art
    assert (art / "README.md").read_text() == "card"
    loaded = QFilters.from_pretrained(art)
    assert torch.equal(loaded.filters, newer.filters) and loaded.provenance == {"v": 2}
    assert sorted(p.name for p in art.parent.iterdir()) == ["art"]


def test_unserialisable_provenance_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="JSON"):
        make_filters(provenance={"when": object()}).save_pretrained(tmp_path / "art")
    with pytest.raises(ArtifactError, match="JSON"):
        make_filters(provenance={"loss": float("nan")}).save_pretrained(tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- Hub code path


@pytest.fixture
def hub(saved: tuple[QFilters, Path], tmp_path: Path):
    _, art = saved
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name in ("config.json", "model.safetensors"):
        (foreign / name).write_bytes((art / name).read_bytes())
    with FakeHub() as fake:
        fake.add_dir("us/tiny_qfilt", art)
        fake.add_dir("nthngdy/tiny_qfilt", foreign)
        yield fake


def test_hub_download_then_offline_from_cache(saved: tuple[QFilters, Path], hub: FakeHub, tmp_path: Path) -> None:
    qf, _ = saved
    cache = tmp_path / "hf-cache"
    ours = QFilters.from_pretrained("us/tiny_qfilt", endpoint=hub.url, cache_dir=cache)
    theirs = QFilters.from_pretrained("nthngdy/tiny_qfilt", endpoint=hub.url, cache_dir=cache)
    assert torch.equal(ours.filters, qf.filters) and ours.provenance == qf.provenance
    assert torch.equal(theirs.filters, qf.filters) and theirs.provenance == {}
    seen = len(hub.requests)
    for repo in ("us/tiny_qfilt", "nthngdy/tiny_qfilt"):
        again = QFilters.from_pretrained(repo, endpoint=hub.url, cache_dir=cache, local_files_only=True)
        assert torch.equal(again.filters, qf.filters)
    assert len(hub.requests) == seen  # served from the HF cache, no network


def test_hub_tampered_file_fails_sha_and_names_the_repo_file(hub: FakeHub, tmp_path: Path) -> None:
    blob = bytearray(hub.repos["us/tiny_qfilt"]["model.safetensors"])
    blob[-1] ^= 0x01
    hub.repos["us/tiny_qfilt"]["model.safetensors"] = bytes(blob)
    with pytest.raises(ArtifactError, match="does not match tensor_sha256") as info:
        QFilters.from_pretrained("us/tiny_qfilt", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert info.value.path == "hf://us/tiny_qfilt/model.safetensors"


@pytest.mark.parametrize(
    ("repo", "kwargs", "error", "words"),
    [
        ("us/missing", {}, ArtifactNotFoundError, ["us/missing", "not found", "Repository Not Found"]),
        ("us/tiny_qfilt", {"revision": "v2"}, ArtifactNotFoundError, ["no revision 'v2'", "Revision Not Found"]),
        ("us/gated", {}, ArtifactNotFoundError, ["us/gated", "gated", "token"]),
        ("us/no_weights", {}, ArtifactError, ["hf://us/no_weights/model.safetensors", "does not exist"]),
        ("a/b/c", {}, ArtifactNotFoundError, ["no such directory"]),
    ],
    ids=["repo-not-found", "revision-not-found", "gated", "entry-not-found", "bad-repo-id"],
)
def test_hub_errors_are_translated(
    hub: FakeHub, tmp_path: Path, repo: str, kwargs: dict, error: type[Exception], words: list[str]
) -> None:
    hub.repos["us/gated"] = dict(hub.repos["us/tiny_qfilt"])
    hub.gated.add("us/gated")
    hub.repos["us/no_weights"] = {"config.json": hub.repos["us/tiny_qfilt"]["config.json"]}
    with pytest.raises(error) as info:
        QFilters.from_pretrained(repo, endpoint=hub.url, cache_dir=tmp_path / "c", token="hf_secret_do_not_log",
                                 **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message
    assert "hf_secret_do_not_log" not in message
    if repo != "a/b/c":
        assert info.value.__cause__ is not None  # the huggingface_hub error stays attached


def test_uncached_repo_with_local_files_only(tmp_path: Path) -> None:
    with pytest.raises(ArtifactNotFoundError) as info:
        QFilters.from_pretrained("nthngdy/not-cached_qfilt", local_files_only=True, cache_dir=tmp_path / "c")
    message = str(info.value)
    assert "nthngdy/not-cached_qfilt" in message and "cache" in message and "local_files_only=True" in message
    assert info.value.__cause__ is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import huggingface_hub.utils._http as http
    http.time.sleep = lambda s: None   # huggingface_hub retries refused connections with backoff; skip the wait
    from qfilters.artifact import QFilters
    try:
        qf = QFilters.from_pretrained(sys.argv[1])
        print(json.dumps({"ok": qf.filters.tolist(), "provenance": qf.provenance}))
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e), "module": type(e).__module__}))
    """
)


def _child(repo: str, **env: str) -> dict:
    ambient = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_TOKEN")
    full = {k: v for k, v in os.environ.items() if k not in ambient}
    full.update(env)
    proc = subprocess.run([sys.executable, "-c", _CHILD, repo], capture_output=True, text=True, env=full, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hf_endpoint_and_offline_environment_variables(
    saved: tuple[QFilters, Path], hub: FakeHub, tmp_path: Path
) -> None:
    qf, _ = saved
    home = str(tmp_path / "hf-home")
    # HF_ENDPOINT is honoured (read by huggingface_hub at import time, hence a child process)
    got = _child("us/tiny_qfilt", HF_ENDPOINT=hub.url, HF_HOME=home)
    assert got.get("ok") == qf.filters.tolist(), got
    assert got["provenance"] == qf.provenance
    # HF_HUB_OFFLINE: the cached copy still loads, an uncached repo gives a clear offline error
    assert _child("us/tiny_qfilt", HF_ENDPOINT=hub.url, HF_HOME=home, HF_HUB_OFFLINE="1").get("ok")
    offline = _child("us/other", HF_ENDPOINT=hub.url, HF_HOME=home, HF_HUB_OFFLINE="1")
    # FiltersNotFoundError subclasses ArtifactNotFoundError: an id that is not a repo is also tried as a base model id
    assert offline["error"] in ("ArtifactNotFoundError", "FiltersNotFoundError"), offline
    assert "HF_HUB_OFFLINE" in offline["message"] and "us/other" in offline["message"]


def test_hf_endpoint_with_nothing_listening(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{_free_port()}"
    got = _child("us/tiny_qfilt", HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"))
    assert got.get("error") in ("ArtifactNotFoundError", "FiltersNotFoundError"), got
    assert got["module"] == "qfilters.errors"
    assert endpoint in got["message"] and "us/tiny_qfilt" in got["message"]
    assert "Connection refused" in got["message"] or "ConnectError" in got["message"]
