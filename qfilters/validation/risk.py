"""Architecture risk: what the Q-Filters paper ties to success or failure, read off the model before any compute,
then completed with the anisotropy actually measured during calibration.

Warnings are plain-language sentences for people deciding whether to publish filters. They never decide the verdict
on their own: the gates (``qfilters.validation.gates``) do, from measured numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qfilters.models import ModelInfo
from qfilters.validation.schema import ArchitectureRisk
from qfilters.validation.stability import rnd

#: sigma1 / sigma2 below this: the head's queries have no clearly dominant direction.
NEAR_ISOTROPIC_SIGMA_RATIO = 1.5
#: share of queries projecting positively on v1+ below this: the "queries lie on one side" assumption is weak.
LOW_POSITIVE_SHARE = 0.75


def compressed_layers_of(info: ModelInfo, model: Any = None) -> list[int]:
    """Layers whose KV cache Q-Filters evict: the full-attention layers.

    With the model at hand this is exactly what the cache and the evaluator use (``qfilters.architecture``);
    from ``ModelInfo`` alone, every layer that is not a sliding-window layer.
    """
    if model is not None:
        from qfilters.architecture import compressed_layers

        return compressed_layers(model)
    sliding = set(info.sliding_layers)
    return [i for i in range(info.num_layers) if i not in sliding]


def _layer_list(layers: Sequence[int]) -> str:
    return ", ".join(str(i) for i in layers)


def architecture_warnings(info: ModelInfo, compressed: Sequence[int]) -> list[str]:
    """Plain-language warnings from architecture facts alone (no forward pass)."""
    out: list[str] = []
    if info.qk_norm:
        out.append(
            "This model normalizes its queries and keys (QK-norm). The Q-Filters paper reports that the method fails "
            "on QK-norm models (OLMo-2): after normalization the keys' projection on the query direction carries "
            "little information, so expect little or no gain over simply keeping the most recent tokens "
            "(StreamingLLM)."
        )
    if info.qkv_bias:
        out.append(
            "This model adds a bias to its query/key/value projections. The paper reports weaker Q-Filters results "
            "on such models (Qwen-2.5)."
        )
    if not info.rope:
        out.append(
            "This model does not use rotary position embeddings (RoPE). Q-Filters were derived and tested on RoPE "
            "models; whether one fixed filter per head ranks keys well here is untested."
        )
    sliding = list(info.sliding_layers)
    if sliding:
        window = f" of {info.sliding_window} tokens" if info.sliding_window else ""
        out.append(
            f"{len(sliding)} of {info.num_layers} layers use sliding-window attention{window}: their cache is "
            "already bounded by the window and Q-Filters do not compress them. Only "
            f"{len(compressed)} layer{'s' if len(compressed) != 1 else ''} "
            f"({_layer_list(compressed) or 'none'}) are compressed, so the memory saved is limited to those layers."
        )
    if not compressed:
        out.append(
            "No layer of this model uses full attention, so Q-Filters would compress nothing: publishing filters "
            "for it has no effect on memory."
        )
    return out


def _flat(rows: Any, layers: Sequence[int]) -> torch.Tensor | None:
    if not rows:
        return None
    t = torch.tensor(rows, dtype=torch.float64)  # [L][H_q]
    if layers:
        t = t[list(layers)]
    return t.flatten() if t.numel() else None


def anisotropy(
    statistics: dict[str, Any], compressed: Sequence[int]
) -> tuple[float | None, float | None, float | None, list[str]]:
    """Measured anisotropy of the (published) filters over the compressed layers' query heads.

    ``statistics`` is ``QFilters.provenance["statistics"]`` (sigma_ratio and positive_share are [L][H_q]).
    Returns sigma-ratio median and min, positive-share median, and plain-language warnings.
    """
    sigma = _flat(statistics.get("sigma_ratio"), compressed)
    share = _flat(statistics.get("positive_share"), compressed)
    where = "the compressed layers" if compressed else "all layers"
    warnings: list[str] = []
    sigma_median = sigma_min = share_median = None
    if sigma is not None:
        sigma_median, sigma_min = rnd(float(sigma.median())), rnd(float(sigma.min()))
        weak = int((sigma < NEAR_ISOTROPIC_SIGMA_RATIO).sum())
        if weak:
            warnings.append(
                f"{weak} of {sigma.numel()} query heads in {where} are nearly isotropic (largest singular value less "
                f"than {NEAR_ISOTROPIC_SIGMA_RATIO}x the second): their queries have no dominant direction, so a "
                "single fixed filter ranks keys poorly in those heads."
            )
    if share is not None:
        share_median = rnd(float(share.median()))
        low = int((share < LOW_POSITIVE_SHARE).sum())
        if low:
            warnings.append(
                f"In {low} of {share.numel()} query heads in {where}, fewer than {LOW_POSITIVE_SHARE:.0%} of queries "
                "point along the filter direction; Q-Filters assume queries mostly lie on one side of it, so those "
                "heads may keep the wrong keys."
            )
    return sigma_median, sigma_min, share_median, warnings


def assess(
    info: ModelInfo,
    model: Any = None,
    statistics: dict[str, Any] | None = None,
) -> ArchitectureRisk:
    """The report's architecture section: facts and warnings before calibration, plus anisotropy after it."""
    compressed = compressed_layers_of(info, model)
    warnings = architecture_warnings(info, compressed)
    sigma_median = sigma_min = share_median = None
    if statistics is not None:
        sigma_median, sigma_min, share_median, measured = anisotropy(statistics, compressed)
        warnings += measured
    return ArchitectureRisk(
        model_type=info.model_type,
        num_layers=info.num_layers,
        num_attention_heads=info.num_attention_heads,
        num_kv_heads=info.num_kv_heads,
        head_dim=info.head_dim,
        qk_norm=info.qk_norm,
        qkv_bias=info.qkv_bias,
        rope=info.rope,
        sliding_window=info.sliding_window,
        sliding_layers=list(info.sliding_layers),
        compressed_layers=list(compressed),
        sigma_ratio_median=sigma_median,
        sigma_ratio_min=sigma_min,
        positive_share_median=share_median,
        warnings=warnings,
    )
