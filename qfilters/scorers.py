"""Per-key eviction scores: one small class per method, one ``score()`` each (higher = keep).

Every scorer here is *causal*: a key's score depends on that key, its layer/head, its absolute position and at most
the keys before it, never on later keys or on queries. That is what lets the cache score a key once when it arrives,
and what gives greedy eviction a closed form, so the one-pass evaluator (``qfilters.evaluate``) is exact rather than
an approximation. Most are *static* (the key alone); those that read earlier keys (:class:`NoveltyScorer`, and
:class:`BlendScorer`, which adds novelty to a static score) carry a running state from step to step through
:meth:`Scorer.score_stream`.

Expressions follow kvpress where it has the method (``QFilterPress``, ``KnormPress``), evaluated in the keys' dtype
with the same operation order, then widened to float32, so rankings agree with kvpress's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from qfilters.errors import ShapeMismatchError
from qfilters.eviction import force_sinks
from qfilters.rope import unrotate

if TYPE_CHECKING:
    from qfilters.policy_table import ScorerInputs

__all__ = [
    "Scorer",
    "QFilterScorer",
    "KNormScorer",
    "StreamingLLMScorer",
    "RandomScorer",
    "NoveltyScorer",
    "ContentNoveltyScorer",
    "BlendScorer",
    "AgedScorer",
    "make_scorer",
]


def _check_keys(keys: Tensor, positions: Tensor) -> None:
    if keys.dim() != 4:
        raise ShapeMismatchError(f"keys must be [batch, kv_heads, seq_len, head_dim], got shape {tuple(keys.shape)}")
    if positions.dim() != 1 or positions.shape[0] != keys.shape[2]:
        raise ShapeMismatchError(
            f"positions must be 1-D with one entry per key (keys shape {tuple(keys.shape)}), "
            f"got shape {tuple(positions.shape)}"
        )


class Scorer(ABC):
    """Scores cached keys; higher = keep. Subclasses must stay causal per key (see module docstring)."""

    name: ClassVar[str] = "base"

    @abstractmethod
    def score(self, keys: Tensor, layer_idx: int, positions: Tensor) -> Tensor:
        """keys [B, H_kv, T, D] post-RoPE as cached; positions [T] absolute positions (long) -> [B, H_kv, T] float32.

        ``keys`` are a whole sequence from its start (a scorer that reads earlier keys starts from none)."""

    def score_stream(self, keys: Tensor, layer_idx: int, positions: Tensor,
                     state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Scores of keys that continue a sequence, and the state to pass with the next keys.

        ``state`` is what this method returned for the same layer's previous keys (None at the sequence start); a
        state is a tensor whose first dimension is the batch, so a cache can reorder it with its beams. Static
        scorers keep none; the cache calls this, so that scoring token by token equals scoring the whole sequence.
        """
        return self.score(keys, layer_idx, positions), None

    @classmethod
    def from_inputs(cls, inputs: ScorerInputs) -> Scorer:
        """Build from the policy table's inputs (default: no inputs; override to take filters, statistics...)."""
        return cls()

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:  # noqa: B027 - optional hook
        """Raise :class:`ShapeMismatchError` if this scorer cannot score this model's keys (default: any model)."""

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the scorer (for results and provenance)."""
        return {"name": self.name}


@dataclass
class QFilterScorer(Scorer):
    """Q-Filters: score = -(f . k) with f the stored filter of the key's layer and KV head (kvpress's expression).

    The stored filter is ``-v1+`` (public format), so the score is the key's projection on the dominant query
    direction: keys that queries will attend to most score high and are kept.
    ``filters`` is a tensor ``[L, H_kv, D]`` or anything with a ``.filters`` attribute holding one (``QFilters``).
    """

    filters: Any
    name: ClassVar[str] = "qfilters"

    def __post_init__(self) -> None:
        filters = getattr(self.filters, "filters", self.filters)
        if not isinstance(filters, torch.Tensor):
            raise TypeError(f"filters must be a tensor [L, H_kv, D] or a QFilters, got {type(self.filters).__name__}")
        if filters.dim() != 3 or min(filters.shape) == 0:
            raise ShapeMismatchError(
                f"filters must be a non-empty tensor [num_layers, num_kv_heads, head_dim], got {tuple(filters.shape)}"
            )
        if not filters.is_floating_point():
            raise TypeError(f"filters must be floating point, got dtype {filters.dtype}")
        self.filters = filters.detach()

    @classmethod
    def from_inputs(cls, inputs: ScorerInputs) -> QFilterScorer:
        return cls(inputs.filters)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.filters.shape)

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        if self.shape != (num_layers, num_kv_heads, head_dim):
            raise ShapeMismatchError(
                f"Q-Filters have shape {self.shape} [layers, kv_heads, head_dim] but the model needs "
                f"{(num_layers, num_kv_heads, head_dim)}; were these filters calibrated for another model?"
            )

    def score(self, keys: Tensor, layer_idx: int, positions: Tensor) -> Tensor:
        _check_keys(keys, positions)
        num_layers, num_kv_heads, head_dim = self.shape
        if not 0 <= layer_idx < num_layers:
            raise ShapeMismatchError(f"layer {layer_idx} out of range for Q-Filters of shape {self.shape}")
        if (keys.shape[1], keys.shape[3]) != (num_kv_heads, head_dim):
            raise ShapeMismatchError(
                f"keys of shape {tuple(keys.shape)} [B, kv_heads, T, head_dim] do not match Q-Filters of shape "
                f"{self.shape} [layers, kv_heads, head_dim]"
            )
        f = self.filters[layer_idx][None, :, None].to(device=keys.device, dtype=keys.dtype)  # [1, H, 1, D]
        return (-(f * keys).sum(dim=-1)).float()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape)}


@dataclass
class KNormScorer(Scorer):
    """K-norm (Devoto et al. 2024): keep low-norm keys, score = -||k||_2 (kvpress ``KnormPress``)."""

    name: ClassVar[str] = "knorm"

    def score(self, keys: Tensor, layer_idx: int, positions: Tensor) -> Tensor:
        _check_keys(keys, positions)
        return (-keys.norm(dim=-1)).float()


@dataclass
class _SinkScorer(Scorer):
    """A scorer that forces its ``n_sinks`` first positions to +inf (kept), whatever its policy's sinks."""

    n_sinks: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.n_sinks, bool) or not isinstance(self.n_sinks, int) or self.n_sinks < 0:
            raise ValueError(f"n_sinks must be a non-negative integer, got {self.n_sinks!r}")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_sinks": self.n_sinks}


@dataclass
class StreamingLLMScorer(_SinkScorer):
    """StreamingLLM (Xiao et al. 2023): keep ``n_sinks`` attention sinks and the most recent keys.

    Sinks score +inf, any other key its position, so the newest keys win the remaining slots.
    """

    name: ClassVar[str] = "streamingllm"

    @classmethod
    def from_inputs(cls, inputs: ScorerInputs) -> StreamingLLMScorer:
        return cls(n_sinks=inputs.n_sinks)

    def score(self, keys: Tensor, layer_idx: int, positions: Tensor) -> Tensor:
        _check_keys(keys, positions)
        pos = positions.to(device=keys.device, dtype=torch.float32)
        pos = pos.expand(keys.shape[0], keys.shape[1], -1)  # [T] -> [B, H, T]
        return force_sinks(pos, positions, self.n_sinks).clone()


@dataclass
class NoveltyScorer(_SinkScorer):
    """Novelty: keep keys that point away from what the text has said so far, score = -cos(k_t, k_0 + ... + k_t)
    per layer and KV head.

    Why: Q-Filters and the moment scorers keep the keys an average query attends to, i.e. keys that look like most
    keys; a one-off fact (a number said once, a passkey) looks like none of them and is evicted first. Its keys point
    away from the running sum of the document's keys. Causal (the running sum stops at the key itself), so the
    one-pass evaluator stays exact; the cache carries the sum (float64, [B, H_kv, D]) through :meth:`score_stream`.
    No calibration, no attention weights: FlashAttention-compatible, O(d) per key.

    The first key is its own running sum (cosine 1, the lowest score) although it is the attention sink every later
    query leans on: the first ``n_sinks`` keys are forced to +inf, as StreamingLLM forces them.
    """

    name: ClassVar[str] = "novelty"

    @classmethod
    def from_inputs(cls, inputs: ScorerInputs) -> NoveltyScorer:
        return cls()  # its own sinks, whatever StreamingLLM's (``inputs.n_sinks``) or a policy's are

    def score(self, keys: Tensor, layer_idx: int, positions: Tensor) -> Tensor:
        return self.score_stream(keys, layer_idx, positions, None)[0]

    def score_stream(self, keys: Tensor, layer_idx: int, positions: Tensor,
                     state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        _check_keys(keys, positions)
        scores, new_state = novelty_stream(keys, state, positions, self._rope_row(layer_idx))
        return force_sinks(scores, positions, self.n_sinks), new_state

    def _rope_row(self, layer_idx: int) -> Tensor | None:
        """The rotary frequencies to undo on this layer's keys (None: score the cached keys as they are)."""
        return None


@dataclass(kw_only=True)
class ContentNoveltyScorer(NoveltyScorer):
    """Novelty of what a key says, not where it sits: the same score on keys with RoPE undone (``frequencies``: the
    model's per-layer inverse frequencies, :func:`qfilters.rope.rope_frequencies`).

    Why: a running sum of cached (rotated) keys cancels in the fast-rotating dimensions, so plain novelty mostly reads
    the few slow ones. Un-rotated, a passkey's digits stand out from the prose around them in every dimension: on
    SmolLM2 it keeps many more needles than plain novelty and, blended into Q-Filters, loses less perplexity (see
    BENCHMARKS.md). Still causal, static once a key is cached and O(d) per key (the position is known)."""

    frequencies: Tensor  # [num_layers, d_rot / 2]
    name: ClassVar[str] = "content-novelty"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.frequencies = _check_frequencies(self.frequencies)

    @classmethod
    def from_inputs(cls, inputs: ScorerInputs) -> ContentNoveltyScorer:
        return cls(frequencies=inputs.rope)

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        _check_frequency_shape(self.frequencies, num_layers, head_dim)

    def _rope_row(self, layer_idx: int) -> Tensor | None:
        return _frequency_row(self.frequencies, layer_idx)


def _check_frequencies(frequencies: Any) -> Tensor:
    if not isinstance(frequencies, torch.Tensor) or frequencies.dim() != 2 or min(frequencies.shape) == 0:
        raise ShapeMismatchError("frequencies must be a non-empty tensor [num_layers, d_rot / 2] "
                                 "(qfilters.rope.rope_frequencies(model))")
    if not bool(torch.isfinite(frequencies).all()):
        raise ValueError("rotary frequencies must be finite")
    return frequencies.detach().to("cpu", torch.float64)


def _check_frequency_shape(frequencies: Tensor, num_layers: int, head_dim: int) -> None:
    if frequencies.shape[0] != num_layers or 2 * frequencies.shape[1] > head_dim:
        raise ShapeMismatchError(f"rotary frequencies of shape {tuple(frequencies.shape)} do not fit a model of "
                                 f"{num_layers} layers with head dim {head_dim}")


def _frequency_row(frequencies: Tensor, layer_idx: int) -> Tensor:
    if not 0 <= layer_idx < frequencies.shape[0]:
        raise ShapeMismatchError(f"no rotary frequencies for layer {layer_idx} (table of shape "
                                 f"{tuple(frequencies.shape)})")
    return frequencies[layer_idx]


def novelty_stream(keys: Tensor, state: Tensor | None, positions: Tensor | None = None,
                   frequencies: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """-cos(k_t, state + k_0 + ... + k_t) per key [B, H, T] (float32, no sinks) and the running sum after the last key
    (float64 [B, H, D]; ``state`` when there are no keys). With ``frequencies`` ([d_rot / 2]) the keys are first
    rotated back from ``positions`` (content novelty)."""
    if frequencies is not None and positions is None:
        raise ValueError("content novelty needs the keys' positions to undo RoPE")
    wide = keys.double() if frequencies is None or positions is None else unrotate(keys, positions, frequencies)
    running = wide.cumsum(dim=2)  # sequential sums: scoring token by token gives the same bits
    if state is not None:
        if state.shape != (keys.shape[0], keys.shape[1], keys.shape[3]):
            raise ShapeMismatchError(f"novelty state of shape {tuple(state.shape)} does not continue keys of "
                                     f"shape {tuple(keys.shape)}")
        running = state[:, :, None].to(running.device) + running
    scores = -torch.nn.functional.cosine_similarity(wide, running, dim=-1).float()
    return scores, (running[:, :, -1].clone() if keys.shape[2] else state)  # not a view pinning [B, H, T, D]


def _per_head_table(table: Any, field_name: str, label: str) -> Tensor:
    """A [num_layers, num_kv_heads] tensor of finite, non-negative numbers, detached float32; else the reason."""
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or min(table.shape) == 0:
        raise ShapeMismatchError(f"{field_name} must be a non-empty tensor [num_layers, num_kv_heads]")
    if not bool(torch.isfinite(table).all()) or bool((table < 0).any()):
        raise ValueError(f"{label} must be finite and non-negative")
    return table.detach().float()


def _check_row(table: Tensor, keys: Tensor, layer_idx: int, label: str) -> None:
    """``table`` [L, H_kv] has a row for ``layer_idx`` with one entry per KV head of ``keys``."""
    if not 0 <= layer_idx < table.shape[0] or keys.shape[1] != table.shape[1]:
        raise ShapeMismatchError(f"keys of layer {layer_idx} with {keys.shape[1]} KV heads do not match {label} "
                                 f"of shape {tuple(table.shape)}")


@dataclass(kw_only=True)
class BlendScorer(_SinkScorer):
    """A static scorer plus novelty, weighted per layer and KV head: score = base + weights[l, h] * novelty.

    Why: Q-Filters keep the keys an average query reads, novelty the one-off ones it would miss; on prose the sum
    loses less perplexity than either. The two live on different scales per head, so a recipe sets ``weights`` to
    ``w * spread(base) / spread(novelty)`` with spreads measured on calibration text (see
    :func:`qfilters.recipes.score_spread`). Causal, with novelty's running sum as the stream state; ``n_sinks`` first
    keys are forced as for :class:`NoveltyScorer` (the first key is its own running sum).

    ``solo`` ([num_layers, num_kv_heads] bool) marks heads scored by novelty alone: the recall heads a question reads
    details through (:mod:`qfilters.recall_heads`), where keeping the one-off keys matters more than the base's.
    """

    base: Scorer
    weights: Tensor  # [num_layers, num_kv_heads]
    frequencies: Tensor | None = None  # rotary frequencies [num_layers, d_rot / 2]: content novelty; None: plain
    solo: Tensor | None = None  # [num_layers, num_kv_heads] bool: heads ranked by novelty alone
    name: ClassVar[str] = "blend"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.base, Scorer):
            raise TypeError(f"base must be a Scorer, got {type(self.base).__name__}")
        if type(self.base).score_stream is not Scorer.score_stream:
            raise TypeError(f"the base of a blend must be a static scorer, not {self.base.name!r}")
        self.weights = _per_head_table(self.weights, "weights", "blend weights")
        if self.frequencies is not None:
            self.frequencies = _check_frequencies(self.frequencies)
        if self.solo is not None:
            if not isinstance(self.solo, torch.Tensor) or self.solo.dtype != torch.bool \
                    or tuple(self.solo.shape) != tuple(self.weights.shape):
                raise ShapeMismatchError(f"solo must be a bool tensor shaped like the weights "
                                         f"{tuple(self.weights.shape)} [layers, kv_heads]")
            self.solo = self.solo.detach().cpu()

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        self.base.check_model(num_layers, num_kv_heads, head_dim)
        if self.frequencies is not None:
            _check_frequency_shape(self.frequencies, num_layers, head_dim)
        if tuple(self.weights.shape) != (num_layers, num_kv_heads):
            raise ShapeMismatchError(f"blend weights have shape {tuple(self.weights.shape)} [layers, kv_heads] but "
                                     f"the model has {(num_layers, num_kv_heads)}")

    def score(self, keys: Tensor, layer_idx: int, positions: Tensor) -> Tensor:
        return self.score_stream(keys, layer_idx, positions, None)[0]

    def score_stream(self, keys: Tensor, layer_idx: int, positions: Tensor,
                     state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        _check_keys(keys, positions)
        _check_row(self.weights, keys, layer_idx, "blend weights")
        row = None if self.frequencies is None else _frequency_row(self.frequencies, layer_idx)
        novelty, new_state = novelty_stream(keys, state, positions, row)
        weight = self.weights[layer_idx][None, :, None].to(novelty.device)
        scores = self.base.score(keys, layer_idx, positions).float() + weight * novelty
        if self.solo is not None and bool(self.solo[layer_idx].any()):
            scores = torch.where(self.solo[layer_idx][None, :, None].to(novelty.device), novelty, scores)
        return force_sinks(scores, positions, self.n_sinks), new_state

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "base": self.base.describe(), "n_sinks": self.n_sinks,
               "weights": [[round(float(x), 6) for x in row] for row in self.weights]}
        if self.frequencies is not None:
            out["novelty"] = ContentNoveltyScorer.name
        if self.solo is not None:
            out["solo"] = [[int(layer), int(head)] for layer, head in self.solo.nonzero().tolist()]
        return out


@dataclass
class AgedScorer(Scorer):
    """Another scorer with an age discount: score = inner + rates[l, h] * position, so an old key must beat a newer
    one by ``rates[l, h]`` per token of age to stay.

    Why: a hard recent window keeps the last keys whatever their score and judges every older key by its score
    alone; text also has a soft recency (a key read 100 tokens ago is more likely read again than one from 1000
    tokens ago). The discount is that soft window between Q-Filters (rates 0) and StreamingLLM (rates -> inf). A
    recipe sets ``rates`` to ``w * spread / layer budget`` (the spread of its scorer; of the base, for a blend): a key
    loses ``w`` spreads of score for every budget's worth of keys that came after it. Static per key given its
    position (the inner scorer's stream state passes through), so greedy eviction and the one-pass evaluator stay
    exact; sinks forced by the inner scorer stay +inf.
    """

    inner: Scorer
    rates: Tensor  # [num_layers, num_kv_heads], score units per position
    name: ClassVar[str] = "aged"

    def __post_init__(self) -> None:
        if not isinstance(self.inner, Scorer):
            raise TypeError(f"inner must be a Scorer, got {type(self.inner).__name__}")
        self.rates = _per_head_table(self.rates, "rates", "age discount rates")

    @property
    def n_sinks(self) -> int:
        """The inner scorer's own forced sinks (a recipe's layers pay for them)."""
        return int(getattr(self.inner, "n_sinks", 0))

    def check_model(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        self.inner.check_model(num_layers, num_kv_heads, head_dim)
        if tuple(self.rates.shape) != (num_layers, num_kv_heads):
            raise ShapeMismatchError(f"age discount rates have shape {tuple(self.rates.shape)} [layers, kv_heads] "
                                     f"but the model has {(num_layers, num_kv_heads)}")

    def score(self, keys: Tensor, layer_idx: int, positions: Tensor) -> Tensor:
        return self.score_stream(keys, layer_idx, positions, None)[0]

    def score_stream(self, keys: Tensor, layer_idx: int, positions: Tensor,
                     state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        _check_keys(keys, positions)
        _check_row(self.rates, keys, layer_idx, "age discount rates")
        scores, new_state = self.inner.score_stream(keys, layer_idx, positions, state)
        rate = self.rates[layer_idx].to(scores.device, torch.float64)[None, :, None]
        age_term = rate * positions.to(scores.device, torch.float64)[None, None]  # summed in float64, then float32:
        # the same bits whether a key is scored in the cache or by the one-pass evaluator
        return (scores.double() + age_term).float(), new_state

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "inner": self.inner.describe(),
                "rates": [[round(float(x), 9) for x in row] for row in self.rates]}


_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """Integer mix of int64 values kept below 2**32 (products stay < 2**63: no overflow, same result on any device)."""
    x = x & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


@dataclass
class RandomScorer(Scorer):
    """Random eviction baseline, reproducible: a hash of (seed, layer, head, position), identical across batch rows,
    devices and call patterns (the cache scoring one token at a time gets the same numbers as one-pass scoring)."""

    seed: int = 0
    name: ClassVar[str] = "random"

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    @classmethod
    def from_inputs(cls, inputs: ScorerInputs) -> RandomScorer:
        return cls(seed=inputs.seed)

    def score(self, keys: Tensor, layer_idx: int, positions: Tensor) -> Tensor:
        _check_keys(keys, positions)
        batch, heads = keys.shape[0], keys.shape[1]
        pos = positions.to(device=keys.device, dtype=torch.int64)[None, :]  # [1, T]
        head = torch.arange(heads, device=keys.device, dtype=torch.int64)[:, None]  # [H, 1]
        x = _hash32(torch.tensor(self.seed, device=keys.device, dtype=torch.int64))
        x = _hash32(x ^ layer_idx)
        x = _hash32(x ^ head)  # [H, 1]
        x = _hash32(x ^ pos)  # [H, T]
        u = (x >> 8).float() / float(1 << 24)  # 24 bits: exact in float32, uniform in [0, 1)
        return u[None].expand(batch, -1, -1).clone()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed}


def make_scorer(name: str, filters: Any = None, **inputs: Any) -> Scorer:
    """Build a scorer by its policy-table name; ``filters`` for ``qfilters``, other inputs by keyword
    (``n_sinks``, ``seed``, ``query_stats``; see :class:`qfilters.policy_table.ScorerInputs`)."""
    from qfilters.policy_table import ScorerInputs, build_scorer

    return build_scorer(name, ScorerInputs(filters=filters, **inputs))
