"""Streaming statistics of post-RoPE queries, from which Q-Filters are read off.

The first right singular vector of a head's query matrix Q [N, D] is the top eigenvector of Q^T Q [D, D], so we only
keep that d x d second moment (float64, per layer and query head) and the query sum (for the sign rule). Memory is
O(L * H * D^2) whatever the number of calibration tokens. Sequences alternate between two halves so that a split-half
estimate (sampling noise) comes for free: the total is the sum of the halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Directions:
    """Top query directions per (layer, query head), sign-fixed to point along the queries (v1+)."""

    v1: torch.Tensor  # [L, Hq, D] float64, unit norm, mean projection of queries >= 0
    sigma_ratio: torch.Tensor  # [L, Hq] sigma1 / sigma2 (anisotropy; 1.0 = isotropic)


def top_directions(second_moment: torch.Tensor, query_sum: torch.Tensor) -> Directions:
    """Top eigenvectors of [..., D, D] second moments, signed so that sum(q) . v1 >= 0."""
    evals, evecs = torch.linalg.eigh(second_moment)  # ascending eigenvalues
    v1 = evecs[..., :, -1]  # [..., D]
    sign = torch.sign((v1 * query_sum).sum(-1, keepdim=True))
    sign[sign == 0] = 1.0
    v1 = v1 * sign
    top, second = evals[..., -1].clamp_min(0), evals[..., -2].clamp_min(0)
    # singular values are square roots of the eigenvalues of Q^T Q
    ratio = torch.sqrt(top) / torch.sqrt(second).clamp_min(torch.finfo(torch.float64).tiny)
    return Directions(v1=v1, sigma_ratio=ratio)


def group_mean(v1: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[L, Hq, D] -> [L, Hkv, D]: mean of the query heads sharing a KV head, in ``repeat_kv`` order."""
    layers, hq, d = v1.shape
    return v1.reshape(layers, num_kv_heads, hq // num_kv_heads, d).mean(dim=2)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


class QueryStatistics:
    """Accumulates per-(layer, query head) second moments of queries in two halves, in float64."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, device: torch.device | str = "cpu") -> None:
        shape = (2, num_layers, num_heads)
        self.second_moment = torch.zeros(*shape, head_dim, head_dim, dtype=torch.float64, device=device)
        self.query_sum = torch.zeros(*shape, head_dim, dtype=torch.float64, device=device)
        self.count = torch.zeros(2, num_layers, dtype=torch.int64, device=device)
        # running direction used to measure the share of queries with a positive projection (see `positive_share`)
        self._probe: torch.Tensor | None = None  # [L, Hq, D]
        self._positive = torch.zeros(num_layers, num_heads, dtype=torch.int64, device=device)
        self._probed = torch.zeros(num_layers, dtype=torch.int64, device=device)

    @classmethod
    def merged(cls, parts: list[QueryStatistics]) -> QueryStatistics:
        """Statistics of the union of the parts' tokens (sums are exact; halves stay halves)."""
        first = parts[0]
        out = cls(first.num_layers, first.second_moment.shape[2], first.second_moment.shape[-1], first.count.device)
        for p in parts:
            if p.second_moment.shape != first.second_moment.shape:
                raise ValueError("cannot merge statistics of models with different shapes")
            out.second_moment += p.second_moment
            out.query_sum += p.query_sum
            out.count += p.count
            out._positive += p._positive
            out._probed += p._probed
        return out

    @property
    def num_layers(self) -> int:
        return self.second_moment.shape[1]

    @property
    def tokens(self) -> int:
        """Tokens seen per layer (the same for every layer once a forward pass is complete)."""
        return int(self.count[:, 0].sum())

    def add(self, layer: int, queries: torch.Tensor, half_of_row: torch.Tensor,
            token_mask: torch.Tensor | None) -> None:
        """Add queries [B, Hq, T, D] of one layer; ``half_of_row`` [B] in {0, 1}; ``token_mask`` [B, T] (True: real)."""
        q = queries.transpose(1, 2)  # [B, T, Hq, D]
        if token_mask is None:
            token_mask = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
        for half in (0, 1):
            rows = token_mask & (half_of_row == half)[:, None].to(token_mask.device)  # [B, T]
            if not bool(rows.any()):
                continue
            x = q[rows].to(torch.float64)  # [N, Hq, D]
            self.second_moment[half, layer] += torch.einsum("nhd,nhe->hde", x, x)
            self.query_sum[half, layer] += x.sum(0)
            self.count[half, layer] += x.shape[0]
            if self._probe is not None:
                self._positive[layer] += (torch.einsum("nhd,hd->nh", x, self._probe[layer]) > 0).sum(0)
                self._probed[layer] += x.shape[0]

    def directions(self, half: int | None = None) -> Directions:
        """Sign-fixed top directions of all tokens (``half=None``) or of one half."""
        if half is None:
            return top_directions(self.second_moment.sum(0), self.query_sum.sum(0))
        return top_directions(self.second_moment[half], self.query_sum[half])

    @property
    def probing(self) -> bool:
        return self._probe is not None

    def refresh_probe(self) -> None:
        """Use the current estimate to measure positive projections of the queries that come next."""
        self._probe = self.directions().v1

    def positive_share(self) -> torch.Tensor | None:
        """[L, Hq] share of queries with a positive projection on v1+, measured against the running estimate.

        Exact shares would need a second pass over the data; the running estimate converges to v1+ within a few
        thousand tokens, so this is what we record (None if no query was probed yet).
        """
        if int(self._probed.min()) == 0:
            return None
        return self._positive.to(torch.float64) / self._probed[:, None].to(torch.float64)
