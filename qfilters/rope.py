"""Undoing RoPE on cached keys, so a scorer can compare what keys say rather than where they sit.

The cache holds keys after the rotary embedding: key j is rotated by angle ``j * inv_freq[i]`` in each pair of
dimensions ``(i, i + d_rot / 2)`` (the ``rotate_half`` layout of Llama, Qwen, Gemma, Mistral, ...). Summing such keys
over positions cancels the fast-rotating pairs, so a running sum of cached keys mostly reads the few slow ones; a
key's position is known to every scorer, so rotating it back is exact and costs O(d) per key.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from qfilters.architecture import text_config

__all__ = ["rope_frequencies", "unrotate"]

#: rope types whose frequencies change with the sequence length at run time: a fixed inverse would be wrong
_LENGTH_DEPENDENT = ("dynamic", "longrope")


def _rotary_module(model_or_config: Any) -> Any:
    """The model's rotary embedding module; for a config, a fresh one built by transformers from it (computing the
    inverse frequencies is all it does at construction, so no weights are needed)."""
    modules = getattr(model_or_config, "modules", None)
    if modules is None:
        return _rotary_from_config(text_config(model_or_config))
    for module in modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            return module
    raise ValueError(f"{type(model_or_config).__name__} has no rotary embedding module: its keys carry no RoPE to "
                     "undo")


def _rotary_from_config(config: Any) -> Any:
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ValueError(f"{type(config).__name__} names no model type: pass the loaded model instead")
    if not isinstance(model_type, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", model_type):  # it names a module
        raise ValueError(f"model type {model_type!r} is not a transformers model type: pass the loaded model instead")
    module_name = model_type_to_module_name(model_type)
    try:
        modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    except ImportError as e:
        raise ValueError(f"transformers has no modeling code for {model_type!r}: pass the loaded model "
                         "instead") from e
    classes = [getattr(modeling, n) for n in dir(modeling) if n.endswith("RotaryEmbedding") and not n.startswith("_")]
    if len(classes) != 1:
        raise ValueError(f"{model_type!r} has {len(classes)} rotary embedding classes in transformers, cannot tell "
                         "which its keys use: pass the loaded model instead")
    return classes[0](config)


def rope_frequencies(model: Any) -> Tensor:
    """Per layer, the inverse frequencies its keys were rotated with: float64 [num_layers, d_rot / 2].

    Reads the model's own rotary embedding (one per layer type where the model has several, e.g. Gemma-3's local
    and global layers); given a config, the one transformers builds from it. ValueError for a model without RoPE or
    a rope type whose frequencies depend on the sequence length."""
    rotary = _rotary_module(model)
    config = text_config(model)
    rope_type = getattr(rotary, "rope_type", "default")
    kinds = set(rope_type.values()) if isinstance(rope_type, dict) else {rope_type}
    if kinds & set(_LENGTH_DEPENDENT):
        raise ValueError(f"rope type {sorted(kinds)} changes its frequencies with the sequence length; content "
                         "novelty supports fixed-frequency RoPE only")
    types = getattr(config, "layer_types", None) or [None] * int(config.num_hidden_layers)
    rows = []
    for kind in types:
        freq = getattr(rotary, f"{kind}_inv_freq", None) if kind is not None else None
        if freq is None:
            freq = getattr(rotary, "inv_freq", None)
        if freq is None:
            raise ValueError(f"cannot find the inverse frequencies of {type(rotary).__name__} for layer type "
                             f"{kind!r}")
        rows.append(freq.detach().to("cpu", torch.float64))
    return torch.stack(rows)


def unrotate(keys: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Keys [..., T, D] as they were before RoPE at ``positions`` [T] (``inv_freq`` [d_rot / 2]; dimensions past
    ``d_rot`` are not rotated, as in partial-rotary models). Computed in float64."""
    rot = 2 * inv_freq.shape[-1]
    if rot > keys.shape[-1]:
        raise ValueError(f"{inv_freq.shape[-1]} rotary frequencies need keys of at least {rot} dimensions, "
                         f"got {keys.shape[-1]}")
    wide = keys.double()
    angles = positions.to(device=keys.device, dtype=torch.float64)[:, None] * inv_freq.to(keys.device)[None, :]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # [T, d_rot]
    part, rest = wide[..., :rot], wide[..., rot:]
    half = rot // 2
    rotated_half = torch.cat([-part[..., half:], part[..., :half]], dim=-1)
    return torch.cat([part * cos - rotated_half * sin, rest], dim=-1)
