"""Cross-dataset and within-dataset stability of Q-Filters, computed head by head.

Filters calibrated on K datasets are compared pairwise with the cosine of each (layer, KV head) filter. A head whose
filter points the same way whatever the text scores ~1; a head that flips or wanders shows in ``min`` and in
``per_head_min``. Split-half cosines (two halves of one calibration run) say how much of that is sampling noise.

Pure functions of tensors and nested lists: no model, no I/O. Every float is rounded to ``DIGITS`` decimals so the
report is byte-identical across identical runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qfilters.query_stats import cosine
from qfilters.validation.schema import CosineSummary, StabilityReport, rnd

DIGITS = 6
DEFAULT_COSINE_THRESHOLD = 0.9  # a head "agrees" across datasets (or halves) when its cosine is at least this


def percentile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolation percentile (``q`` in [0, 100]) of a flat tensor, computed in float64."""
    v = values.detach().flatten().to(torch.float64)
    if v.numel() == 0:
        raise ValueError("percentile of no values")
    return float(torch.quantile(v, q / 100.0))


def summarize(values: torch.Tensor, threshold: float = DEFAULT_COSINE_THRESHOLD) -> CosineSummary:
    """Mean, min, 5th percentile and share of values >= ``threshold`` of a tensor of cosines (any shape)."""
    v = values.detach().flatten().to(torch.float64)
    if v.numel() == 0:
        raise ValueError("cannot summarize an empty set of cosines")
    return CosineSummary(
        mean=rnd(float(v.mean())),
        min=rnd(float(v.min())),
        p5=rnd(percentile(v, 5.0)),
        share_above=rnd(float((v >= threshold).to(torch.float64).mean())),
        threshold=threshold,
    )


def _as_tensor(filters: object) -> torch.Tensor:
    t = getattr(filters, "filters", filters)  # a QFilters or a raw [L, H_kv, D] tensor
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        raise ValueError(f"expected filters [layers, kv_heads, head_dim], got {type(filters).__name__}")
    return t.detach().to(torch.float64)


def pairwise_cosines(filter_sets: Sequence[object]) -> dict[tuple[int, int], torch.Tensor]:
    """Cosine per (layer, KV head) for every pair ``i < j`` of filter sets -> {(i, j): [L, H_kv] float64}."""
    tensors = [_as_tensor(f) for f in filter_sets]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"filter sets have different shapes {sorted(shapes)}; they cannot come from one model")
    return {(i, j): cosine(tensors[i], tensors[j])
            for i in range(len(tensors)) for j in range(i + 1, len(tensors))}


def cross_dataset_stability(
    datasets: Sequence[str], filter_sets: Sequence[object], threshold: float = DEFAULT_COSINE_THRESHOLD
) -> StabilityReport:
    """K x K mean/min cosine matrices, a summary over all pairs and heads, per-head minima and per-layer means.

    ``filter_sets[k]`` (a ``QFilters`` or a ``[L, H_kv, D]`` tensor) was calibrated on ``datasets[k]``; K >= 2.
    """
    if len(datasets) != len(filter_sets):
        raise ValueError(f"{len(datasets)} dataset names for {len(filter_sets)} filter sets")
    if len(filter_sets) < 2:
        raise ValueError("cross-dataset stability needs filters calibrated on at least two datasets")
    pairs = pairwise_cosines(filter_sets)
    k = len(filter_sets)
    mean = [[1.0] * k for _ in range(k)]
    low = [[1.0] * k for _ in range(k)]
    for (i, j), c in pairs.items():
        mean[i][j] = mean[j][i] = rnd(float(c.mean()))
        low[i][j] = low[j][i] = rnd(float(c.min()))
    stacked = torch.stack(list(pairs.values()))  # [P, L, H_kv]
    return StabilityReport(
        datasets=list(datasets),
        mean_cosine=mean,
        min_cosine=low,
        summary=summarize(stacked, threshold),
        per_head_min=[[rnd(float(x)) for x in row] for row in stacked.min(dim=0).values],
        per_layer_mean=[rnd(float(x)) for x in stacked.mean(dim=(0, 2))],
    )


def tokens_to_stable(checkpoints: Sequence[dict], threshold: float) -> int | None:
    """Tokens at the first checkpoint whose min agreement with the previous one reaches ``threshold`` (else None)."""
    for cp in checkpoints:
        agreement = cp.get("agreement_min")
        if agreement is not None and agreement >= threshold:
            return int(cp["tokens"])
    return None
