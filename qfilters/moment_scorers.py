"""Static key scorers from calibration query moments (mean and covariance of post-RoPE queries per query head).

All are static per key (a key's score depends on that key and its layer/head only), so the cache scores a key once
when it arrives and the one-pass evaluator (``qfilters.evaluate``) stays exact for them.

* :class:`MeanQueryScorer`: the key's logit under the average query, ``mean_g(mu_h) . k`` over the GQA group.
* :class:`GaussianScorer`: expected attention weight for ``q ~ N(mu_h, Sigma_h)``:
  ``log E[exp(q.k s)] = s mu_h.k + s^2 k^T Sigma_h k / 2`` (s = 1/sqrt(d)), combined over the group's query heads with
  log-sum-exp. ``rank=r`` keeps the top-r eigenpairs of Sigma (O(d r) per key instead of O(d^2)); rank-r Gaussian
  scores are the "rank-r projections" of the query distribution: the key's energy in the r dominant query directions
  plus its logit under the mean. ``variance_weight`` scales the covariance term (1 = the Gaussian formula).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from qfilters.errors import ShapeMismatchError
from qfilters.moments import QueryMoments
from qfilters.scorers import Scorer, _check_keys

if TYPE_CHECKING:
    from qfilters.policy_table import ScorerInputs

__all__ = ["GaussianScorer", "MeanQueryScorer"]


def _check_layer(moments: QueryMoments, keys: Tensor, layer_idx: int) -> None:
    layers, _, d = moments.shape
    if not 0 <= layer_idx < layers:
        raise ShapeMismatchError(f"layer {layer_idx} out of range for query moments of {layers} layers")
    if (keys.shape[1], keys.shape[3]) != (moments.num_kv_heads, d):
        raise ShapeMismatchError(f"keys of shape {tuple(keys.shape)} do not match query moments with "
                                 f"{moments.num_kv_heads} KV heads of dim {d}")


@dataclass
class MeanQueryScorer(Scorer):
    """Score = the key's logit under the mean query of its GQA group (higher = more attended on average)."""

    moments: QueryMoments
    name: ClassVar[str] = "meanq"
    _mean: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        layers, hq, d = self.moments.shape
        g = self.moments.group
        self._mean = self.moments.mean.reshape(layers, hq // g, g, d).mean(dim=2).to(torch.float32)  # [L, Hkv, D]

    @classmethod
    def from_inputs(cls, inputs: ScorerInputs) -> MeanQueryScorer:
        return cls(inputs.query_stats)

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        self.moments.check_model(num_layers, num_kv_heads, head_dim)

    def score(self, keys: Tensor, layer_idx: int, positions: Tensor) -> Tensor:
        _check_keys(keys, positions)
        _check_layer(self.moments, keys, layer_idx)
        mu = self._mean[layer_idx].to(keys.device)[None, :, None]  # [1, H, 1, D]
        return (keys.float() * mu).sum(dim=-1)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "tokens": self.moments.tokens}


@dataclass
class GaussianScorer(Scorer):
    """Expected attention of a Gaussian query per head, log-sum-exp over the GQA group (see module docstring)."""

    moments: QueryMoments
    rank: int | None = None
    variance_weight: float = 1.0
    scale: float | None = None  # attention scaling; None = 1/sqrt(head_dim)
    name: ClassVar[str] = "gaussian"
    _mean: Tensor = field(init=False, repr=False)
    _factor: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not math.isfinite(self.variance_weight) or self.variance_weight < 0:
            raise ValueError(f"variance_weight must be a finite non-negative number, got {self.variance_weight!r}")
        layers, _, d = self.moments.shape
        s = self.scale if self.scale is not None else 1.0 / math.sqrt(d)
        kv, g = self.moments.num_kv_heads, self.moments.group
        factor = self.moments.covariance_factor(self.rank)  # [L, Hq, D, r]
        # s^2/2 * w * ||F^T k||^2  ==  ||(s * sqrt(w/2) F)^T k||^2
        factor = factor * (s * math.sqrt(self.variance_weight / 2))
        self._mean = (s * self.moments.mean).reshape(layers, kv, g, d).to(torch.float32)  # [L, Hkv, G, D]
        self._factor = factor.reshape(layers, kv, g, d, factor.shape[-1]).to(torch.float32)  # [L, Hkv, G, D, r]

    @classmethod
    def from_inputs(cls, inputs: ScorerInputs) -> GaussianScorer:
        return cls(inputs.query_stats)

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        self.moments.check_model(num_layers, num_kv_heads, head_dim)

    def score(self, keys: Tensor, layer_idx: int, positions: Tensor) -> Tensor:
        _check_keys(keys, positions)
        _check_layer(self.moments, keys, layer_idx)
        k = keys.float()
        mean = self._mean[layer_idx].to(k.device)  # [H, G, D]
        factor = self._factor[layer_idx].to(k.device)  # [H, G, D, r]
        linear = torch.einsum("bhtd,hgd->bhgt", k, mean)
        quad = torch.einsum("bhtd,hgdr->bhgtr", k, factor).square().sum(dim=-1)
        return torch.logsumexp(linear + quad, dim=2)  # [B, H, T]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "rank": self.rank, "variance_weight": self.variance_weight,
                "tokens": self.moments.tokens}
