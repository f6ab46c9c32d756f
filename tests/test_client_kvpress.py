"""The kvpress adapter (``qfilters.integrations.kvpress.QFilterPress``) against the real kvpress 0.5.5, in the isolated
venv of ``kvpress_env.py`` (qfilters is put on its ``PYTHONPATH``: the base client needs nothing kvpress lacks).

A real prefill of a small random Llama under ``with press(model):`` compresses the cache with filters from a local
directory, from a repo outside ``nthngdy/`` (at ``main`` and pinned to a tag), and from the model's own id resolved by
Hub search; the kept keys are exactly the top-k of our scores on the uncompressed keys, the press holds our tensor
(never kvpress's random init), kvpress's ``nthngdy/`` naming is never requested, and a second use does not reload.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from kvpress_env import KvpressEnv, ensure_kvpress_env, run_in_env
from safetensors.torch import load_file

from qfilters.artifact import QFilters
from qfilters.scorers import QFilterScorer

ROOT = Path(__file__).resolve().parent.parent
LAYERS, KV_HEADS, HEAD_DIM, T = 2, 2, 16, 40
V1_COMMIT = "1" * 40

KVPRESS_SIDE = r"""
import json, sys
import torch
from safetensors.torch import save_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from qfilters.integrations.kvpress import QFilterPress

job = json.loads(sys.argv[1])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
model = LlamaForCausalLM(config).eval()
model.config.name_or_path = job["model_id"]
ids = torch.randint(0, 97, (1, job["tokens"]), generator=torch.Generator().manual_seed(1))

def prefill(press=None):
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model(ids, past_key_values=cache, use_cache=True)
        else:
            with press(model):
                model(ids, past_key_values=cache, use_cache=True)
    return [layer.keys.contiguous() for layer in cache.layers]

out = {f"full_{i}": k for i, k in enumerate(prefill())}
for name, kwargs in job["cases"].items():
    press = QFilterPress(compression_ratio=0.5, **kwargs)
    for use in range(2):  # kvpress calls post_init_from_model on every use
        kept = prefill(press)
        if use == 0:
            first = press.loaded
    assert press.loaded is first, "the filters were reloaded on the second use"
    out[f"{name}_filters"] = press.q_filters.detach().float().contiguous()
    for i, k in enumerate(kept):
        out[f"{name}_kept_{i}"] = k
    print(json.dumps({name: press.loaded.source}))
save_file(out, job["out"])
"""


@pytest.fixture(scope="module")
def kvpress_env() -> KvpressEnv:
    try:
        return ensure_kvpress_env()
    except Exception as e:  # noqa: BLE001 - a build problem must be visible, not skipped
        pytest.fail(f"could not build the isolated kvpress venv: {e}", pytrace=False)


@pytest.mark.interop
def test_kvpress_adapter_compresses_a_real_prefill_with_filters_from_anywhere(
    kvpress_env: KvpressEnv, tmp_path: Path
) -> None:
    gen = torch.Generator().manual_seed(0)
    main, v1 = (QFilters(torch.randn(LAYERS, KV_HEADS, HEAD_DIM, generator=gen), provenance={"v": v})
                for v in ("main", "v1"))
    local = main.save_pretrained(tmp_path / "local")
    cases = {
        "local": ({"filters": str(local)}, main),
        "repo": ({"filters": "acme/tiny-llama-qfilters"}, main),
        "repo_v1": ({"filters": "acme/tiny-llama-qfilters", "revision": "v1"}, v1),
        "base_id": ({}, main),  # the model's own id, resolved by Hub search
    }
    with FakeHub() as hub:
        hub.add_dir("acme/tiny-llama-qfilters", local,
                    tags=["q-filters", "base_model:acme/Tiny-Llama", "qfilters-verdict:pass"])
        hub.add_dir("acme/tiny-llama-qfilters", v1.save_pretrained(tmp_path / "v1"), commit=V1_COMMIT, refs=("v1",))
        job = {"model_id": "acme/Tiny-Llama", "tokens": T, "out": str(tmp_path / "out.safetensors"),
               "cases": {name: kwargs for name, (kwargs, _) in cases.items()}}
        proc = run_in_env(kvpress_env, KVPRESS_SIDE, json.dumps(job), extra_env={
            "PYTHONPATH": str(ROOT), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "QFILTERS_CACHE": str(tmp_path / "qf")})
        assert not any("/nthngdy/" in path for _, path in hub.requests)  # kvpress's own naming is never used

    sources = {k: v for line in proc.stdout.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}
    assert sources["local"]["kind"] == "local" and sources["repo"]["kind"] == "repo"
    assert sources["repo_v1"]["commit"] == V1_COMMIT
    assert sources["base_id"] == {**sources["base_id"], "kind": "hub-search", "repo_id": "acme/tiny-llama-qfilters"}

    result = load_file(tmp_path / "out.safetensors")
    for name, (_, expected) in cases.items():
        assert torch.equal(result[f"{name}_filters"], expected.filters), name  # ours, not kvpress's random init
        for layer in range(LAYERS):
            full, kept = result[f"full_{layer}"], result[f"{name}_kept_{layer}"]
            assert full.shape[2] == T and kept.shape[2] == T // 2, name  # the prefill really was compressed
            scores = QFilterScorer(expected).score(full, layer, torch.arange(full.shape[2]))
            top = scores.topk(kept.shape[2], dim=-1).indices
            assert torch.equal(full.gather(2, top.unsqueeze(-1).expand(-1, -1, -1, HEAD_DIM)), kept), (name, layer)
    assert not torch.equal(result["repo_kept_0"], result["repo_v1_kept_0"])  # the pinned revision is another set
