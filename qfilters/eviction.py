"""Eviction policy math, shared by the cache (step by step) and the one-pass evaluator (closed form).

Policy. A layer stores at most ``budget`` keys per KV head. After each update it keeps the ``window`` most recent
positions and, among the older ones, the ``budget - window`` best by score; equal scores go to the EARLIER position.
Sinks (``n_sinks`` first positions) score +inf, which with that tie-break keeps them all.

Closed form. With static scores (``qfilters.scorers``), decoding token by token, the keys stored before step ``t``
are the window ``{t-W .. t-1}`` plus the top-k (k = budget - W) of every position that has left the window,
``{0 .. t-1-W}``: the top-k of a growing set under a fixed total order is the running top-k. Let ``e(j)`` be the
position of the k-th key (in position order) that beats ``j``. ``j`` is in the top-k of ``{0..m}`` iff ``e(j) > m``,
so query ``t`` sees key ``j`` iff ``j <= t <= W + max(j, e(j))`` (``e(j) = inf`` when fewer than k keys beat ``j``).
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

# Elements of the [.., T, chunk] comparison block built at once when computing e(j): bounds peak memory at
# ~ 2**25 * (1 byte bool + 4 bytes int32 cumsum) ~ 160 MiB whatever T, batch or head count.
_BLOCK_ELEMENTS = 1 << 25


def force_sinks(scores: Tensor, positions: Tensor, n_sinks: int) -> Tensor:
    """Scores with the ``n_sinks`` first positions set to +inf: with the earlier-wins tie-break, all are kept.
    The one place sinks are applied (eviction policies and the StreamingLLM scorer both call it)."""
    if n_sinks <= 0:
        return scores
    sink = (positions.to(scores.device) < n_sinks)[None, None, :]  # [1, 1, T]
    return scores.masked_fill(sink, float("inf"))


def prepare_scores(scores: Tensor, positions: Tensor, n_sinks: int = 0) -> Tensor:
    """float32 scores with sinks forced to +inf and NaN (never a valid ranking) sent to -inf; [B, H, T] -> same."""
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    return force_sinks(scores, positions, n_sinks)


def select_kept(scores: Tensor, n_keep: int) -> Tensor:
    """Indices [B, H, n_keep] (ascending) of the n_keep best of ``scores`` [B, H, S] given in position order.

    A stable descending sort makes the earlier position win ties, deterministically on every device.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_keep]
    return order.sort(dim=-1).values


def eviction_horizon(scores: Tensor, n_old: int, window: int) -> Tensor:
    """Last query position that still sees each key: ``W + max(j, e(j))`` -> long [B, H, T].

    ``scores`` [B, H, T] in position order (sinks already applied). ``n_old`` = budget - window slots for old keys.
    Keys never evicted within the sequence get a horizon >= T. On CPU an O(T log T) sweep per head; on accelerators
    an O(T^2) elementwise form (no host round trip), chunked to bound memory. Both are tested against each other.
    """
    length = scores.shape[-1]
    e = _kth_beater_sweep(scores, n_old) if scores.device.type == "cpu" else _kth_beater_dense(scores, n_old)
    pos = torch.arange(length, device=scores.device)
    return window + torch.maximum(pos.expand_as(e), e)


def _kth_beater_sweep(scores: Tensor, k: int) -> Tensor:
    """e(j) by visiting keys best-first (the beaters of j are exactly the keys visited before it) while a max-heap
    holds the k smallest positions visited so far: e(j) is its top once it holds k. long [B, H, T], T = never."""
    batch, heads, length = scores.shape
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices.tolist()  # ties: earlier first
    out = [[[length] * length for _ in range(heads)] for _ in range(batch)]
    for b in range(batch):
        for h in range(heads):
            e = out[b][h]
            heap: list[int] = []  # heap of -position: the k smallest positions among the keys visited
            for j in order[b][h]:
                if len(heap) == k:
                    e[j] = -heap[0]
                    if j < -heap[0]:
                        heapq.heapreplace(heap, -j)
                else:
                    heapq.heappush(heap, -j)
    return torch.tensor(out, dtype=torch.long, device=scores.device)


def _kth_beater_dense(scores: Tensor, k: int) -> Tensor:
    """e(j) from the running count of beaters, [.., C, T] blocks at a time (C chosen to bound memory)."""
    batch, heads, length = scores.shape
    pos = torch.arange(length, device=scores.device)
    e = torch.empty(batch, heads, length, dtype=torch.long, device=scores.device)
    chunk = max(1, _BLOCK_ELEMENTS // max(1, batch * heads * length))
    s_i = scores[..., None, :]  # [B, H, 1, T]: the challengers i, along the last (contiguous) dim
    for start in range(0, length, chunk):
        stop = min(length, start + chunk)
        s_j = scores[..., start:stop, None]  # [B, H, C, 1]: the keys j whose e(j) we compute
        earlier = pos[None, :] < pos[start:stop, None]  # [C, T]: i < j
        beats = (s_i > s_j) | ((s_i == s_j) & earlier)  # [B, H, C, T]: i beats j (never i == j)
        count = beats.cumsum(dim=-1, dtype=torch.int32)  # [B, H, C, T]: beaters among positions <= i
        # e(j) = first i where the count reaches k = number of i before that; = T if never reached
        e[..., start:stop] = (count < k).sum(dim=-1)
        del beats, count
    return e
