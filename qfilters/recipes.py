"""Eviction recipes: per-layer budgets, windows, sinks and scorer at a fixed total KV memory.

A recipe says how a total of ``budget x compressible layers`` stored keys (per KV head) is spent: which scorer ranks
old keys, what share of each layer's budget is a recent window, how many sinks are forced, how the total is split
across layers (``uniform``; ``pyramid``: more to early layers, linearly; ``sensitivity``: half uniform, half in
proportion to each layer's measured perplexity loss when compressed alone), and how many first layers are kept whole
(paid for at the sequence length, out of the same total).

A recipe at a budget is a :class:`~qfilters.policy.LayerwisePolicy` (one ``EvictionPolicy`` per layer), which the
cache, the one-pass evaluator and passkey retrieval all take: evaluation stays exact, since each layer is still
greedy eviction with static scores (checked against token-by-token decoding in tests/test_recipes_passkey.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from qfilters.policy import EvictionPolicy, LayerwisePolicy

if TYPE_CHECKING:
    from torch import Tensor

    from qfilters.scorers import Scorer

__all__ = ["ALLOCATIONS", "Recipe", "allocate", "layer_policies", "layer_sensitivity"]

ALLOCATIONS = ("uniform", "pyramid", "sensitivity")


@dataclass(frozen=True)
class Recipe:
    """JSON-able description of an eviction recipe (the scorer by name; see :func:`layer_policies`)."""

    scorer: str
    window_share: float = 0.125
    n_sinks: int = 0
    allocation: str = "uniform"
    full_layers: int = 0  # first compressible layers kept whole, paid for out of the total

    def __post_init__(self) -> None:
        if not 0.0 <= self.window_share < 1.0:
            raise ValueError(f"window_share must be in [0, 1), got {self.window_share}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.n_sinks < 0 or self.full_layers < 0:
            raise ValueError("n_sinks and full_layers must be non-negative")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        return (f"{self.scorer} w={self.window_share:g} s={self.n_sinks} {self.allocation}"
                + (f" full={self.full_layers}" if self.full_layers else ""))


def _round_to_total(weights: Sequence[float], total: int, minimum: int) -> list[int]:
    """Integers >= minimum, proportional to ``weights``, summing to ``total`` (largest remainder, earlier wins ties)."""
    n = len(weights)
    spare = total - minimum * n
    if spare < 0:
        raise ValueError(f"a total of {total} keys cannot give {n} layers at least {minimum} each")
    w_sum = sum(weights)
    raw = [spare * w / w_sum for w in weights]
    base = [math.floor(x) for x in raw]
    left = spare - sum(base)
    order = sorted(range(n), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[:left]:
        base[i] += 1
    return [minimum + b for b in base]


def allocate(allocation: str, budget: int, n_layers: int, minimum: int,
             sensitivity: Sequence[float] | None = None, total: int | None = None) -> list[int]:
    """Per-layer budgets summing to ``total`` (default ``budget * n_layers``), each at least ``minimum``."""
    total = budget * n_layers if total is None else total
    if allocation == "uniform":
        weights = [1.0] * n_layers
    elif allocation == "pyramid":  # 1.5x the mean at the first layer down to 0.5x at the last
        weights = [1.5 - (i / max(1, n_layers - 1)) for i in range(n_layers)]
    elif allocation == "sensitivity":
        if sensitivity is None or len(sensitivity) != n_layers:
            raise ValueError(f"the sensitivity allocation needs one sensitivity per compressed layer ({n_layers})")
        s = [max(float(x), 0.0) for x in sensitivity]
        s_sum = sum(s) or 1.0
        weights = [0.5 / n_layers + 0.5 * x / s_sum for x in s]
    else:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    return _round_to_total(weights, total, minimum)


def layer_policies(recipe: Recipe, scorer: Scorer, budget: int, compress_layers: Sequence[int], seq_len: int,
                   sensitivity: Sequence[float] | None = None) -> LayerwisePolicy:
    """The per-layer policy of ``recipe`` at a mean ``budget`` over ``compress_layers`` (first ones kept whole).

    Total memory is ``budget * len(compress_layers)`` keys per KV head; a layer kept whole costs ``seq_len``.
    ``sensitivity`` is per entry of ``compress_layers`` (only the ``sensitivity`` allocation reads it).
    """
    layers = list(compress_layers)
    whole, rest = layers[: recipe.full_layers], layers[recipe.full_layers:]
    total = budget * len(layers) - seq_len * len(whole)
    minimum = recipe.n_sinks + 2
    if total < minimum * len(rest):
        raise ValueError(f"keeping {len(whole)} layers whole at {seq_len} tokens leaves {total} keys for "
                         f"{len(rest)} layers at budget {budget}: fewer first layers or a larger budget")
    sens = None if sensitivity is None else list(sensitivity)[recipe.full_layers:]
    budgets = allocate(recipe.allocation, budget, len(rest), minimum, sens, total)
    out: dict[int, EvictionPolicy | None] = {i: None for i in whole}
    for i, b in zip(rest, budgets, strict=True):
        window = min(b - recipe.n_sinks - 1, round(recipe.window_share * b))
        out[i] = EvictionPolicy(scorer, b, window, recipe.n_sinks)
    return LayerwisePolicy(out)


@dataclass
class Sensitivity:
    """Per compressible layer: mean NLL increase per token when only that layer is compressed."""

    layers: list[int]
    nll_increase: list[float] = field(default_factory=list)


def layer_sensitivity(model: Any, chunks: Sequence[Tensor], scorer: Scorer, budget: int, window: int,
                      score_last: int) -> Sensitivity:
    """Compress one layer at a time (``budget``/``window``); NLL increase per token on ``chunks`` (calibration text)."""
    from qfilters.architecture import compressed_layers
    from qfilters.onepass import perplexity

    layers = compressed_layers(model)
    full = sum(perplexity(model, c, None, score_last).nll_sum for c in chunks)
    out = Sensitivity(layers)
    n_tok = score_last * sum(c.shape[0] for c in chunks)
    for i in layers:
        alone = LayerwisePolicy({i: EvictionPolicy(scorer, budget, window)})
        nll = sum(perplexity(model, c, alone, score_last).nll_sum for c in chunks)
        out.nll_increase.append((nll - full) / n_tok)
    return out
