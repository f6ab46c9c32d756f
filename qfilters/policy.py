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
    """

    scorer: Scorer
    budget: int
    window: int = 64
    n_sinks: int = 0
    uncompressed_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        from qfilters.scorers import Scorer

        if not isinstance(self.scorer, Scorer):
            raise TypeError(f"scorer must be a qfilters.scorers.Scorer, got {type(self.scorer).__name__}")
        check_budget(self.budget, self.window, self.n_sinks)
        layers = tuple(self.uncompressed_layers)
        bad = [i for i in layers if not _is_count(i)]
        if bad:
            raise ValueError(f"uncompressed_layers must be layer indices (non-negative integers), got {bad}")
        object.__setattr__(self, "uncompressed_layers", tuple(sorted(set(layers))))

    @property
    def min_budget(self) -> int:
        """The fewest keys any compressing layer stores: sequences no longer than this never evict."""
        return self.budget

    def for_layer(self, layer_idx: int) -> EvictionPolicy | None:
        """This layer's policy; None when the layer keeps its whole cache."""
        return None if layer_idx in self.uncompressed_layers else self

    def check_model(self, model_or_config: Any) -> None:
        """Raise before any forward pass if this policy cannot run on the model (layers out of range, wrong shape)."""
        from qfilters.architecture import layer_kinds, model_dims

        layer_kinds(model_or_config, self.uncompressed_layers)
        self.scorer.check_model(*model_dims(model_or_config))

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
        return {"scorer": self.scorer.describe(), "budget": self.budget, "window": self.window,
                "n_sinks": self.n_sinks, "uncompressed_layers": list(self.uncompressed_layers)}


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
        return min((p.budget for p in self.layers.values() if p is not None), default=sys.maxsize)

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

    def describe(self) -> dict[str, Any]:
        return {"layers": {str(i): None if p is None else p.describe() for i, p in self.layers.items()}}

    @classmethod
    def uniform(cls, policy: EvictionPolicy, layers: Sequence[int]) -> LayerwisePolicy:
        """``policy`` on each of ``layers``, the others kept whole."""
        return cls({i: policy for i in layers})


PolicyLike = EvictionPolicy | LayerwisePolicy
