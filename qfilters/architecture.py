"""Architecture facts of a transformers model, read once here: dimensions, layer kinds, attention flags.

The cache, the one-pass evaluator, calibration, the validator's risk assessment and the model registry all ask the
same questions (how many layers, KV heads and head dim; which layers are full attention, hence compressed; does the
model use QK-norm), so they all ask this module, and can never disagree about which layers are compressed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["attention_flags", "compressed_layers", "layer_kinds", "layer_types", "model_dims", "text_config"]

COMPRESS = "compress"  # a full-attention layer whose cache is evicted
KEPT_WHOLE = "full"  # a full-attention layer kept uncompressed on request


def text_config(model_or_config: Any) -> Any:
    """The decoder's text config of a model or config (multimodal configs nest it)."""
    config = getattr(model_or_config, "config", model_or_config)
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def model_dims(model_or_config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim): the shape ``[L, H_kv, D]`` of a filter set for this model."""
    cfg = text_config(model_or_config)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return int(cfg.num_hidden_layers), kv_heads, head_dim


def layer_types(model_or_config: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """Per layer: transformers' layer type (``full_attention``, ``sliding_attention`` ...) and its cache kwargs."""
    cfg = text_config(model_or_config)
    try:  # transformers' own reading of layer_types / per-layer sliding windows, as DynamicCache does
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(cfg)
        return list(types), list(kwargs)
    except (ImportError, AttributeError):  # pragma: no cover - older layouts
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * int(cfg.num_hidden_layers))
        return types, [{"sliding_window": cfg.sliding_window} if "sliding" in t else {} for t in types]


def layer_kinds(model_or_config: Any, uncompressed_layers: Sequence[int] = ()) -> list[str]:
    """Per layer: ``"compress"`` (full attention, evicted), ``"full"`` (kept whole) or the model's own layer type."""
    types, _ = layer_types(model_or_config)
    skip = set(uncompressed_layers)
    bad = sorted(i for i in skip if not (isinstance(i, int) and 0 <= i < len(types)))
    if bad:
        raise ValueError(
            f"uncompressed_layers {bad} out of range: the model has {len(types)} layers (0..{len(types) - 1})"
        )
    return [KEPT_WHOLE if i in skip and t == "full_attention" else COMPRESS if t == "full_attention" else t
            for i, t in enumerate(types)]


def compressed_layers(model_or_config: Any) -> list[int]:
    """Indices of the layers an eviction policy compresses: the full-attention ones."""
    return [i for i, kind in enumerate(layer_kinds(model_or_config)) if kind == COMPRESS]


def attention_flags(model: Any) -> tuple[bool, bool]:
    """(qk_norm, qkv_bias) read off the first attention module (QK-norm is a module, not always a config field)."""
    from qfilters.attention import attention_layers

    layer = attention_layers(model)[0]
    qk_norm = any(hasattr(layer, n) and getattr(layer, n) is not None for n in ("q_norm", "k_norm"))
    q_proj = getattr(layer, "q_proj", None)
    qkv_bias = bool(q_proj is not None and getattr(q_proj, "bias", None) is not None)
    return qk_norm, qkv_bias
