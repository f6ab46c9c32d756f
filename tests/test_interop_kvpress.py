"""Interchangeability with the real kvpress 0.5.5 (``QFilterPress`` and its ``PyTorchModelHubMixin`` loader).

kvpress needs ``transformers<5.3``, so its side runs in an isolated, cached virtualenv (see ``kvpress_env.py``;
built on first use, about a minute from local wheels) and talks to this process through files only.

(a) our ``save_pretrained`` output is loaded by kvpress, both from a directory and through its own Hub path
    (``post_init_from_model`` -> ``nthngdy/<model>_qfilt``, served by a fake Hub), and kvpress's ``score`` /
    ``compress`` agree bit for bit with ``QFilterScorer`` and its top-k;
(b) kvpress's own ``save_pretrained`` output loads unchanged with ``QFilters.from_pretrained``, and our writer
    produces byte-identical ``config.json`` / ``model.safetensors`` for the same tensor.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import kvpress_env as builder
import pytest
import torch
from fake_hub import FakeHub
from kvpress_env import KvpressEnv, ensure_kvpress_env, run_in_env
from safetensors.torch import load_file, save_file

from qfilters.artifact import QFilters, sha256_file
from qfilters.scorers import QFilterScorer

L, H, D, T = 4, 2, 16, 37

KVPRESS_SIDE = r"""
import json, sys, types
import torch
from safetensors.torch import load_file, save_file
from kvpress.presses.qfilter_press import QFilterPress, QFilters

for job in json.loads(sys.argv[1]):
    dtype = getattr(torch, job.get("dtype", "float32"))
    if job["mode"] == "score":
        press = QFilterPress(compression_ratio=job["compression_ratio"])
        if job["via"] == "hub":  # kvpress's real path: nthngdy/<model name>_qfilt through huggingface_hub
            config = types.SimpleNamespace(name_or_path="some-org/" + job["model_name"])
            press.post_init_from_model(types.SimpleNamespace(config=config, dtype=dtype))
        else:  # what post_init_from_model does, from a local directory
            press.q_filters = QFilters.from_pretrained(job["artifact"]).q_filters.to(dtype)
        out = {"q_filters": press.q_filters.detach().float().contiguous()}
        with torch.no_grad():
            for name, keys in load_file(job["keys"]).items():
                layer = int(name.rsplit("_", 1)[1])
                module = types.SimpleNamespace(layer_idx=layer, head_dim=keys.shape[-1])
                out[f"scores_{layer}"] = press.score(module, None, keys, None, None, {}).contiguous()
                kept, _ = press.compress(module, None, keys, keys.clone(), None, {})
                out[f"kept_{layer}"] = kept.contiguous()
        save_file(out, job["out"])
    elif job["mode"] == "save":
        torch.manual_seed(job["seed"])
        filters = QFilters(*job["shape"])  # num_layers, num_kv_heads, kv_head_dim; random init like the class
        filters.save_pretrained(job["out_dir"])
        save_file({"q_filters": filters.q_filters.detach().clone().contiguous()}, job["reference"])
"""


@pytest.fixture(scope="session")
def kvpress_env() -> KvpressEnv:
    try:
        env = ensure_kvpress_env()
    except Exception as e:  # noqa: BLE001 - a build problem must be visible, not skipped
        pytest.fail(f"could not build the isolated kvpress venv: {e}", pytrace=False)
    if env.build_seconds is not None:
        print(f"\nbuilt the kvpress venv at {env.root} in {env.build_seconds}s: {env.versions}")
    return env


def _run_kvpress(env: KvpressEnv, jobs: list[dict], tmp_path: Path, **extra_env: str) -> None:
    base = {"HF_HOME": str(tmp_path / "kvpress-hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
    run_in_env(env, KVPRESS_SIDE, json.dumps(jobs), extra_env={**base, **extra_env})


@pytest.mark.interop
def test_kvpress_loads_our_artifact_and_ranks_keys_like_us(kvpress_env: KvpressEnv, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    ours = QFilters.from_query_filters(torch.randn(L, 2 * H, D, generator=gen), num_kv_heads=H,
                                       provenance={"origin": "interop test"})
    art = ours.save_pretrained(tmp_path / "Tiny-Model_qfilt")

    cases = {  # name -> (how kvpress gets the filters, keys dtype)
        "dir-float32": ("dir", torch.float32),
        "dir-bfloat16": ("dir", torch.bfloat16),
        "hub-float32": ("hub", torch.float32),
    }
    keys: dict[str, dict[str, torch.Tensor]] = {}
    jobs = []
    for name, (via, dtype) in cases.items():
        keys[name] = {f"keys_{layer}": torch.randn(2, H, T, D, generator=gen).to(dtype) for layer in range(L)}
        save_file(keys[name], tmp_path / f"{name}.keys.safetensors")
        jobs.append({
            "mode": "score", "via": via, "dtype": str(dtype).removeprefix("torch."), "compression_ratio": 0.5,
            "artifact": str(art), "model_name": "Tiny-Model", "keys": str(tmp_path / f"{name}.keys.safetensors"),
            "out": str(tmp_path / f"{name}.out.safetensors"),
        })

    with FakeHub() as hub:
        hub.add_dir("nthngdy/Tiny-Model_qfilt", art)
        _run_kvpress(kvpress_env, jobs, tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
        assert any(path.startswith("/nthngdy/Tiny-Model_qfilt/") for _, path in hub.requests)

    for name, (_via, dtype) in cases.items():
        theirs = load_file(tmp_path / f"{name}.out.safetensors")
        # kvpress loads with strict=False: make sure it really holds our tensor, not its random init
        assert torch.equal(theirs["q_filters"], ours.filters.to(dtype).float()), name
        for layer in range(L):
            k = keys[name][f"keys_{layer}"]
            mine = QFilterScorer(ours).score(k, layer, torch.arange(T))  # computed in k's dtype, widened exactly
            kv_scores = theirs[f"scores_{layer}"]
            assert kv_scores.dtype == k.dtype == dtype
            torch.testing.assert_close(mine, kv_scores.float(), rtol=0, atol=0, msg=f"{name} layer {layer}")
            assert torch.equal(mine.argsort(dim=-1, descending=True, stable=True),
                               kv_scores.argsort(dim=-1, descending=True, stable=True))
            kept = theirs[f"kept_{layer}"]
            idx = mine.topk(kept.shape[2], dim=-1).indices  # higher score = kept, as in ScorerPress.compress
            assert 0 < kept.shape[2] < T  # compression really happened
            assert torch.equal(k.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, D)), kept), f"{name} {layer}"


@pytest.mark.interop
def test_we_load_kvpress_saved_filters_unchanged(kvpress_env: KvpressEnv, tmp_path: Path) -> None:
    shape = (5, 3, 8)
    out_dir, reference = tmp_path / "kvpress-saved", tmp_path / "reference.safetensors"
    _run_kvpress(kvpress_env, [{"mode": "save", "seed": 7, "shape": list(shape), "out_dir": str(out_dir),
                                "reference": str(reference)}], tmp_path)
    expected = load_file(reference)["q_filters"]

    loaded = QFilters.from_pretrained(out_dir, expected_shape=shape)
    assert torch.equal(loaded.filters, expected)
    assert loaded.provenance == {} and loaded.shape == shape
    assert json.loads((out_dir / "config.json").read_text()) == {"kv_head_dim": 8, "num_kv_heads": 3, "num_layers": 5}

    # Our writer is byte-compatible with the mixin's: same tensor -> same config.json and model.safetensors.
    mine = QFilters(expected).save_pretrained(tmp_path / "ours")
    assert (mine / "config.json").read_bytes() == (out_dir / "config.json").read_bytes()
    assert sha256_file(mine / "model.safetensors") == sha256_file(out_dir / "model.safetensors")


# ---------------------------------------------------------------------------------------------- the venv builder itself
# Fast checks of the caching logic with the expensive pip work replaced by a stub.


@pytest.fixture
def stub_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    monkeypatch.setenv("QFILTERS_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []
    gate = threading.Event()

    def fake_build(root: Path) -> dict[str, str]:
        calls.append(root)
        root.mkdir(parents=True, exist_ok=True)
        (root / "half-installed").write_text("x")
        gate.wait(0.5)  # stay inside the lock long enough for a concurrent caller to queue up
        return {"kvpress": builder.KVPRESS_VERSION, "torch": builder.torch_version()}

    monkeypatch.setattr(builder, "_build", fake_build)
    return calls


def test_env_is_built_once_under_concurrency_and_then_reused(stub_build: list[Path], tmp_path: Path) -> None:
    results: list[KvpressEnv] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_kvpress_env())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(stub_build) == 1 and len(results) == 4
    assert sum(r.build_seconds is not None for r in results) == 1
    assert len({r.root for r in results}) == 1
    root = results[0].root
    assert root.parent == tmp_path / "cache" and "kvpress-venv-0.5.5-torch" in root.name
    assert ensure_kvpress_env().build_seconds is None and len(stub_build) == 1


def test_partial_env_without_marker_is_rebuilt(stub_build: list[Path]) -> None:
    root = builder.env_dir()
    root.mkdir(parents=True)
    (root / "bin").mkdir()  # an interrupted build: files but no ready marker
    env = ensure_kvpress_env()
    assert stub_build == [root] and env.build_seconds is not None
    assert (root / builder.MARKER).is_file()
    # a marker written for another spec (say, another torch) does not count either
    (root / builder.MARKER).write_text(json.dumps({"spec": {"torch": "torch==0.0"}, "versions": {}}))
    assert ensure_kvpress_env().build_seconds is not None and len(stub_build) == 2
