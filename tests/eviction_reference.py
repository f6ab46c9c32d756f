"""Test-only references for the eviction closed form: dense visibility masks and a brute-force simulation.

The library computes horizons (``qfilters.eviction.eviction_horizon``) and never materializes a [T, T] mask; these
helpers exist to check it against the obvious, slow definition.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qfilters.eviction import eviction_horizon, select_kept
from qfilters.scorers import Scorer


def mask_from_horizon(horizon: Tensor) -> Tensor:
    """bool [B, H, T, T] from horizons [B, H, T]: query t sees key j iff j <= t <= horizon[j]."""
    t = torch.arange(horizon.shape[-1], device=horizon.device)
    causal = t[:, None] >= t[None, :]  # [T(query), T(key)]
    return causal & (t[None, None, :, None] <= horizon[:, :, None, :])  # [B, H, T, T]


def visibility_mask(scores: Tensor, budget: int, window: int) -> Tensor:
    """bool [B, H, T, T]: query t sees key j under greedy eviction (sinks already folded into ``scores``)."""
    return mask_from_horizon(eviction_horizon(scores, budget - window, window))


def simulate_visibility(scores: Tensor, budget: int, window: int) -> Tensor:
    """Brute-force reference for :func:`visibility_mask`: run the cache policy one token at a time.

    Same tie-break and selection code as the cache (``select_kept``); O(T^2 log T), for tests only.
    """
    batch, heads, length = scores.shape
    vis = torch.zeros(batch, heads, length, length, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            stored: list[int] = []
            for t in range(length):
                stored.append(t)
                vis[b, h, t, stored] = True  # attention of step t sees stored + new
                if len(stored) > budget:
                    old = stored[: len(stored) - window]
                    keep = select_kept(scores[b, h, old][None, None], budget - window)[0, 0].tolist()
                    stored = [old[i] for i in keep] + stored[len(stored) - window :]
    return vis


def stored_lengths(cache: object) -> list[int]:
    """Keys a QFiltersCache currently holds per layer (per KV head)."""
    return [int(layer.keys.shape[-2]) if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 else 0
            for layer in cache.layers]  # type: ignore[attr-defined]


class TableScorer(Scorer):
    """Scores read from a fixed table [B, H, T] by absolute position (lets tests choose ties)."""

    name = "table"

    def __init__(self, table: Tensor) -> None:
        self.table = table

    def score(self, keys: Tensor, layer_idx: int, positions: Tensor) -> Tensor:
        return self.table[:, :, positions]
