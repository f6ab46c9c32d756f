"""Eviction recipes: per-layer budgets, windows, sinks and scorer at a fixed total KV memory.

A recipe says how a total of ``budget x compressible layers`` stored keys (per KV head) is spent: which scorer ranks
old keys, what share of each layer's budget is a recent window, how many sinks are forced, how the total is split
across layers (``uniform``; ``pyramid``: more to early layers, linearly; ``sensitivity``: half uniform, half in
proportion to each layer's measured perplexity loss when compressed alone), and how many first layers are kept whole
(paid for at the sequence length, out of the same total).

Evaluation stays exact: each layer is still greedy eviction with static scores, so the closed form of
``qfilters.eviction`` holds per layer (:func:`recipe_perplexity` == token-by-token decoding with
:func:`recipe_cache`, checked in tests/test_recipes.py). Additive to the core: it reuses the evaluator's blockwise
attention; once the core has one ``EvictionPolicy`` (issue 12), a layer policy here is that policy per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from qfilters.attention import attention_hook
from qfilters.errors import ModelError
from qfilters.evaluate import (
    PerplexityResult,
    _block_size,
    _n_scored,
    _result,
    evicted_attention,
)
from qfilters.eviction import check_budget, eviction_horizon, prepare_scores
from qfilters.scorers import Scorer

__all__ = [
    "ALLOCATIONS",
    "LayerPolicy",
    "Recipe",
    "allocate",
    "layer_policies",
    "layer_sensitivity",
    "recipe_cache",
    "recipe_hook",
    "recipe_perplexity",
]

ALLOCATIONS = ("uniform", "pyramid", "sensitivity")


@dataclass(frozen=True)
class LayerPolicy:
    """Greedy eviction of one layer: keep ``window`` recent keys, ``n_sinks`` first ones and the best by score."""

    scorer: Scorer
    budget: int
    window: int
    n_sinks: int = 0

    def __post_init__(self) -> None:
        check_budget(self.budget, self.window, self.n_sinks)


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
                   sensitivity: Sequence[float] | None = None) -> dict[int, LayerPolicy | None]:
    """Layer index -> policy (None = kept whole) for ``recipe`` at a mean ``budget`` over ``compress_layers``.

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
    out: dict[int, LayerPolicy | None] = {i: None for i in whole}
    for i, b in zip(rest, budgets):
        window = min(b - recipe.n_sinks - 1, round(recipe.window_share * b))
        out[i] = LayerPolicy(scorer, b, window, recipe.n_sinks)
    return out


def recipe_hook(policies: dict[int, LayerPolicy | None]) -> Callable[..., Any]:
    """Attention hook applying each layer's greedy eviction (layers absent or None attend to everything)."""

    def hook(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, base_fn: Any,
             **kwargs: Any) -> Any:
        policy = policies.get(module.layer_idx)
        if policy is None:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        length = query.shape[2]
        if key.shape[2] != length:
            raise ModelError("the one-pass evaluator needs a cache-free forward (queries and keys of equal length)")
        positions = torch.arange(length, device=key.device)
        scores = prepare_scores(policy.scorer.score(key, module.layer_idx, positions), positions, policy.n_sinks)
        horizon = eviction_horizon(scores, policy.budget - policy.window, policy.window)
        kwargs.pop("is_causal", None)
        return evicted_attention(module, query, key, value, attention_mask, horizon, base_fn,
                                 _block_size(policy.budget), **kwargs)

    return hook


def _check_layers(model: Any, policies: dict[int, LayerPolicy | None]) -> None:
    from qfilters.cache import layer_kinds, model_dims

    kinds = layer_kinds(model)
    wrong = sorted(i for i, p in policies.items() if p is not None and (not 0 <= i < len(kinds) or
                                                                          kinds[i] != "compress"))
    if wrong:
        raise ValueError(f"layers {wrong} are not full-attention layers of this model; only those can be compressed")
    for p in {id(p): p for p in policies.values() if p is not None}.values():
        p.scorer.check_model(*model_dims(model))


@torch.inference_mode()
def recipe_perplexity(model: Any, input_ids: Tensor, policies: dict[int, LayerPolicy | None],
                      score_last: int | None = None) -> PerplexityResult:
    """Exact perplexity of token-by-token decoding under per-layer policies, in one forward pass (sdpa models)."""
    _check_layers(model, policies)
    length = input_ids.shape[1]
    n = _n_scored(length, score_last)
    input_ids = input_ids.to(next(model.parameters()).device)
    with attention_hook(model, recipe_hook(policies)):
        logits = model(input_ids, use_cache=False, logits_to_keep=n + 1).logits
    return _result(logits[:, :n], input_ids[:, length - n:])


def recipe_cache(model: Any, policies: dict[int, LayerPolicy | None]) -> Any:
    """A :class:`QFiltersCache` whose layers follow ``policies`` (for decoding, and as the exactness reference)."""
    from qfilters.cache import EvictingLayer, QFiltersCache, layer_kinds

    _check_layers(model, policies)
    kinds = layer_kinds(model)
    some = next((p for p in policies.values() if p is not None), None)
    if some is None:
        raise ValueError("a recipe cache needs at least one compressed layer")
    whole = [i for i, k in enumerate(kinds) if k == "compress" and policies.get(i) is None]
    cache = QFiltersCache(model, some.scorer, some.budget, some.window, some.n_sinks, uncompressed_layers=whole)
    for i, p in policies.items():
        if p is not None:
            cache.layers[i] = EvictingLayer(i, p.scorer, p.budget, p.window, p.n_sinks)
    return cache


@dataclass
class Sensitivity:
    """Per compressible layer: mean NLL increase per token when only that layer is compressed."""

    layers: list[int]
    nll_increase: list[float] = field(default_factory=list)


def layer_sensitivity(model: Any, chunks: Sequence[Tensor], scorer: Scorer, budget: int, window: int,
                      score_last: int) -> Sensitivity:
    """Compress one layer at a time (``budget``/``window``); NLL increase per token on ``chunks`` (calibration text)."""
    from qfilters.cache import layer_kinds

    layers = [i for i, k in enumerate(layer_kinds(model)) if k == "compress"]
    full = sum(recipe_perplexity(model, c, {}, score_last).nll_sum for c in chunks)
    out = Sensitivity(layers)
    n_tok = score_last * sum(c.shape[0] for c in chunks)
    for i in layers:
        pol = {i: LayerPolicy(scorer, budget, window)}
        nll = sum(recipe_perplexity(model, c, pol, score_last).nll_sum for c in chunks)
        out.nll_increase.append((nll - full) / n_tok)
    return out
