"""What to evict: one :class:`EvictionPolicy` (scorer, budget, window, sinks, uncompressed layers), validated once.

The cache (``QFiltersCache``), the one-pass evaluator (``perplexity``), its token-by-token reference
(``perplexity_reference``), passkey retrieval and the validator all take a policy, so a setting means the same thing
everywhere and a bad one fails in one place, with one message. A :class:`LayerwisePolicy` gives each compressed
layer its own policy (eviction recipes); both answer :meth:`for_layer`, which is all the eviction code asks.

This module imports no torch at import time: a service checks budgets (:func:`check_budget`) in its API process.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from qfilters.scorers import Scorer

__all__ = ["EvictionPolicy", "LayerwisePolicy", "PolicyLike", "check_budget"]


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_budget(budget: int, window: int, n_sinks: int = 0) -> None:
    """The one legality check of eviction settings: ValueError with the fix in the message."""
    for name, value in (("budget", budget), ("window", window), ("n_sinks", n_sinks)):
        if not _is_count(value):
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if budget <= window + n_sinks:
        raise ValueError(
            f"budget ({budget}) must exceed window + n_sinks ({window} + {n_sinks}): otherwise no slot is left for "
            "the scorer to choose; raise budget or lower window"
        )


@dataclass(frozen=True)
class EvictionPolicy:
    """Greedy eviction: each compressed layer stores at most ``budget`` keys per KV head.

    After every step it keeps the ``window`` most recent positions, the ``n_sinks`` first ones, and the best of the
    rest by ``scorer`` (ties to the earlier position). Layers in ``uncompressed_layers`` keep their whole cache.

    ``head_budgets``/``head_windows`` (one per KV head, built with :meth:`per_head`) let the heads of a layer keep
    different numbers of keys: heads differ far more than layers in what compression costs them, so at the same
    memory a split by measured per-head sensitivity loses less. ``budget`` and ``window`` are then the widest head's.
    """

    scorer: Scorer
    budget: int
    window: int = 64
    n_sinks: int = 0
    uncompressed_layers: tuple[int, ...] = ()
    head_budgets: tuple[int, ...] | None = None
    head_windows: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        from qfilters.scorers import Scorer

        if not isinstance(self.scorer, Scorer):
            raise TypeError(f"scorer must be a qfilters.scorers.Scorer, got {type(self.scorer).__name__}")
        check_budget(self.budget, self.window, self.n_sinks)
        if (self.head_budgets is None) != (self.head_windows is None):
            raise ValueError("head_budgets and head_windows go together: one budget and one window per KV head")
        if self.head_budgets is not None and self.head_windows is not None:
            budgets, windows = tuple(self.head_budgets), tuple(self.head_windows)
            if not budgets or len(budgets) != len(windows):
                raise ValueError(f"head_budgets and head_windows need one entry per KV head each, got "
                                 f"{len(budgets)} and {len(windows)}")
            for b, w in zip(budgets, windows, strict=True):
                check_budget(b, w, self.n_sinks)
            widest = max(range(len(budgets)), key=lambda h: budgets[h])
            if (self.budget, self.window) != (budgets[widest], windows[widest]):
                raise ValueError("budget and window of a per-head policy are its widest head's: build it with "
                                 "EvictionPolicy.per_head")
            object.__setattr__(self, "head_budgets", budgets)
            object.__setattr__(self, "head_windows", windows)
        layers = tuple(self.uncompressed_layers)
        bad = [i for i in layers if not _is_count(i)]
        if bad:
            raise ValueError(f"uncompressed_layers must be layer indices (non-negative integers), got {bad}")
        object.__setattr__(self, "uncompressed_layers", tuple(sorted(set(layers))))

    @classmethod
    def per_head(cls, scorer: Scorer, budgets: Sequence[int], windows: Sequence[int], n_sinks: int = 0,
                 uncompressed_layers: Sequence[int] = ()) -> EvictionPolicy:
        """A policy whose KV head ``h`` keeps ``budgets[h]`` keys, ``windows[h]`` of them recent."""
        budgets, windows = tuple(budgets), tuple(windows)
        if not budgets or len(budgets) != len(windows):
            raise ValueError(f"need one budget and one window per KV head, got {len(budgets)} and {len(windows)}")
        widest = max(range(len(budgets)), key=lambda h: budgets[h])
        return cls(scorer, budgets[widest], windows[widest], n_sinks, tuple(uncompressed_layers), budgets, windows)

    @property
    def is_per_head(self) -> bool:
        """Whether the KV heads keep different numbers of keys (the cache then stores them ragged)."""
        return self.head_budgets is not None and len(set(zip(self.head_budgets, self.head_windows or (),
                                                             strict=True))) > 1

    def head_limits(self, n_heads: int) -> list[tuple[int, int]]:
        """(budget, window) of each of ``n_heads`` KV heads."""
        if self.head_budgets is None or self.head_windows is None:
            return [(self.budget, self.window)] * n_heads
        if len(self.head_budgets) != n_heads:
            raise ValueError(f"this policy has budgets for {len(self.head_budgets)} KV heads, the layer has {n_heads}")
        return list(zip(self.head_budgets, self.head_windows, strict=True))

    @property
    def stored_keys(self) -> int:
        """Keys this layer stores over all its KV heads once full (per sequence): what the policy costs in memory."""
        if self.head_budgets is None:
            raise ValueError("a uniform policy stores budget x the model's KV heads; ask head_limits(n_heads)")
        return sum(self.head_budgets)

    @property
    def min_budget(self) -> int:
        """The fewest keys any compressing head stores: sequences no longer than this never evict."""
        return self.budget if self.head_budgets is None else min(self.head_budgets)

    def horizon(self, scores: Tensor) -> Tensor:
        """Last query position that still sees each key ([B, H, T] prepared scores -> long [B, H, T]): the closed form
        of :func:`qfilters.eviction.eviction_horizon`, head by head when the heads keep different numbers of keys."""
        import torch

        from qfilters.eviction import eviction_horizon

        limits = self.head_limits(scores.shape[1])
        if not self.is_per_head:
            return eviction_horizon(scores, self.budget - self.window, self.window)
        return torch.cat([eviction_horizon(scores[:, h : h + 1], b - w, w) for h, (b, w) in enumerate(limits)], dim=1)

    def for_layer(self, layer_idx: int) -> EvictionPolicy | None:
        """This layer's policy; None when the layer keeps its whole cache."""
        return None if layer_idx in self.uncompressed_layers else self

    def check_model(self, model_or_config: Any) -> None:
        """Raise before any forward pass if this policy cannot run on the model (layers out of range, wrong shape)."""
        from qfilters.architecture import layer_kinds, model_dims

        layer_kinds(model_or_config, self.uncompressed_layers)
        dims = model_dims(model_or_config)
        self.scorer.check_model(*dims)
        self.check_heads(model_or_config)

    def check_heads(self, model_or_config: Any) -> None:
        """Raise when per-head budgets do not match the model's number of KV heads."""
        from qfilters.architecture import model_dims

        if self.head_budgets is not None:
            n_heads = model_dims(model_or_config)[1]
            if len(self.head_budgets) != n_heads:
                raise ValueError(f"this policy has budgets for {len(self.head_budgets)} KV heads; the model has "
                                 f"{n_heads}: was it built for another model?")

    def scores(self, keys: Tensor, layer_idx: int, positions: Tensor) -> Tensor:
        """Keys' eviction scores, ready to rank: the scorer's, sinks forced to +inf, NaN ranked last (``keys`` are a
        whole sequence from its start)."""
        return self.scores_stream(keys, layer_idx, positions, None)[0]

    def scores_stream(self, keys: Tensor, layer_idx: int, positions: Tensor,
                      state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """:meth:`scores` for keys that continue a sequence (the cache's steps), with the scorer's running state."""
        from qfilters.eviction import prepare_scores

        scores, state = self.scorer.score_stream(keys, layer_idx, positions, state)
        return prepare_scores(scores, positions, self.n_sinks), state

    def describe(self) -> dict[str, Any]:
        """JSON-able identity (results and provenance)."""
        out = {"scorer": self.scorer.describe(), "budget": self.budget, "window": self.window,
               "n_sinks": self.n_sinks, "uncompressed_layers": list(self.uncompressed_layers)}
        if self.head_budgets is not None:
            out |= {"head_budgets": list(self.head_budgets), "head_windows": list(self.head_windows or ())}
        return out


@dataclass(frozen=True)
class LayerwisePolicy:
    """One :class:`EvictionPolicy` per compressed layer (a recipe); layers not listed, or listed as None, keep
    their whole cache. Each layer's own ``uncompressed_layers`` is ignored: this mapping says which layers compress."""

    layers: Mapping[int, EvictionPolicy | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [i for i, p in self.layers.items()
               if not _is_count(i) or not (p is None or isinstance(p, EvictionPolicy))]
        if bad:
            raise TypeError(f"layers must map layer indices to EvictionPolicy or None; bad entries for {bad}")
        object.__setattr__(self, "layers", dict(sorted(self.layers.items())))

    @property
    def min_budget(self) -> int:
        """The fewest keys any compressing layer stores: sequences no longer than this never evict."""
        # the smallest layer decides: one layer storing the whole sequence does not stop the others from evicting
        # (no compressing layer at all: nothing ever evicts)
        return min((p.min_budget for p in self.layers.values() if p is not None), default=sys.maxsize)

    def for_layer(self, layer_idx: int) -> EvictionPolicy | None:
        return self.layers.get(layer_idx)

    def check_model(self, model_or_config: Any) -> None:
        from qfilters.architecture import COMPRESS, layer_kinds, model_dims

        kinds = layer_kinds(model_or_config)
        wrong = sorted(i for i, p in self.layers.items()
                       if p is not None and (i >= len(kinds) or kinds[i] != COMPRESS))
        if wrong:
            raise ValueError(f"layers {wrong} are not full-attention layers of this model; only those can be "
                             "compressed")
        dims = model_dims(model_or_config)
        for scorer in {id(p.scorer): p.scorer for p in self.layers.values() if p is not None}.values():
            scorer.check_model(*dims)
        for p in self.layers.values():
            if p is not None:
                p.check_heads(model_or_config)

    def describe(self) -> dict[str, Any]:
        return {"layers": {str(i): None if p is None else p.describe() for i, p in self.layers.items()}}

    @classmethod
    def uniform(cls, policy: EvictionPolicy, layers: Sequence[int]) -> LayerwisePolicy:
        """``policy`` on each of ``layers``, the others kept whole."""
        return cls({i: policy for i in layers})


PolicyLike = EvictionPolicy | LayerwisePolicy
