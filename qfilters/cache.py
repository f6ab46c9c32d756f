"""A transformers 5 ``Cache`` that evicts keys by score: Q-Filters (or any ``Scorer``) for ``model.generate()``.

Full-attention layers get an :class:`EvictingLayer`: each step attends to everything stored plus the new keys, then
the stored state is cut back to ``budget`` keys per KV head (policy in ``qfilters.eviction``, identical to what the
one-pass evaluator computes). Sliding-window layers keep transformers' own ``DynamicSlidingWindowLayer`` (already
bounded), layers listed in ``uncompressed_layers`` a plain ``DynamicLayer``.

Scores are static per key, so each key is scored once, on arrival, and its score is stored next to it: eviction is
a sort over at most ``budget + new`` stored scores, never a rescoring of the cache.

Limitations: no left padding (stored keys are not contiguous positions, so transformers' 2-D padding mask cannot be
mapped onto them), no ``crop`` (assisted decoding), and with ``uncompressed_layers`` the full-attention layers hold
different lengths, which only works where transformers skips the materialized mask (sdpa / flash without padding:
plain ``generate()`` and token-by-token decoding).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from qfilters.eviction import check_budget, prepare_scores, select_kept
from qfilters.scorers import Scorer

__all__ = ["EvictingLayer", "QFiltersCache", "cache_kwargs", "layer_kinds", "model_dims"]


def cache_kwargs(model: Any, cache: Cache) -> dict[str, Cache]:
    """The keyword that hands ``cache`` to ``model(...)`` or ``model.generate(...)``: ``cache`` from transformers
    5.24 on, ``past_key_values`` before (deprecated since, removed in 5.40)."""
    forward = getattr(model, "forward", None)
    try:
        takes_cache = forward is not None and "cache" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes_cache = False
    return {"cache": cache} if takes_cache else {"past_key_values": cache}


def _text_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def model_dims(model_or_config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a model or its config."""
    cfg = _text_config(model_or_config)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return int(cfg.num_hidden_layers), kv_heads, head_dim


def _layer_types(cfg: Any) -> tuple[list[str], list[dict[str, Any]]]:
    try:  # transformers' own reading of layer_types / per-layer sliding windows, as DynamicCache does
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(cfg)
        return list(types), list(kwargs)
    except (ImportError, AttributeError):  # pragma: no cover - older layouts
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * int(cfg.num_hidden_layers))
        return types, [{"sliding_window": cfg.sliding_window} if "sliding" in t else {} for t in types]


def layer_kinds(model_or_config: Any, uncompressed_layers: Sequence[int] = ()) -> list[str]:
    """Per layer: ``"compress"`` (full attention, evicted), ``"full"`` (kept whole) or the model's own layer type.

    The cache and the evaluator both decide from this, so they always compress the same layers.
    """
    cfg = _text_config(model_or_config)
    types, _ = _layer_types(cfg)
    skip = set(uncompressed_layers)
    bad = sorted(i for i in skip if not (isinstance(i, int) and 0 <= i < len(types)))
    if bad:
        raise ValueError(
            f"uncompressed_layers {bad} out of range: the model has {len(types)} layers (0..{len(types) - 1})"
        )
    return ["full" if i in skip and t == "full_attention" else "compress" if t == "full_attention" else t
            for i, t in enumerate(types)]


class EvictingLayer(DynamicLayer):
    """One full-attention layer's cache, bounded to ``budget`` keys per KV head.

    Stored (in position order): ``keys``/``values`` [B, H, S, D], ``scores`` [B, H, S] float32 and ``positions``
    [B, H, S] long (absolute positions; each head keeps its own set). ``seen`` = tokens received so far.
    """

    is_croppable = False

    def __init__(self, layer_idx: int, scorer: Scorer, budget: int, window: int, n_sinks: int = 0) -> None:
        super().__init__()
        check_budget(budget, window, n_sinks)
        self.layer_idx, self.scorer = layer_idx, scorer
        self.budget, self.window, self.n_sinks = budget, window, n_sinks
        self.seen = 0
        self.scores: Tensor | None = None
        self.positions: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads = key_states.shape[:2]
        self.scores = torch.empty(batch, heads, 0, dtype=torch.float32, device=self.device)
        self.positions = torch.empty(batch, heads, 0, dtype=torch.long, device=self.device)

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Return stored + new keys/values for this step's attention, then evict the stored state to ``budget``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, n_new, _ = key_states.shape
        new_pos = torch.arange(self.seen, self.seen + n_new, device=key_states.device)  # [n]
        new_scores = prepare_scores(self.scorer.score(key_states, self.layer_idx, new_pos), new_pos, self.n_sinks)
        self.seen += n_new

        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        scores = torch.cat([self.scores, new_scores], dim=-1)
        positions = torch.cat([self.positions, new_pos.expand(batch, heads, n_new)], dim=-1)
        self.keys, self.values, self.scores, self.positions = self._evict(keys, values, scores, positions)
        return keys, values

    def _evict(self, keys: Tensor, values: Tensor, scores: Tensor, positions: Tensor) -> tuple[Tensor, ...]:
        stored = scores.shape[-1]
        if stored <= self.budget:
            return keys, values, scores, positions
        n_old = stored - self.window  # candidates: everything but the window, in position order
        kept = select_kept(scores[..., :n_old], self.budget - self.window)  # [B, H, budget - W]
        window = torch.arange(n_old, stored, device=scores.device).expand(*kept.shape[:2], self.window)
        idx = torch.cat([kept, window], dim=-1)  # [B, H, budget], ascending = position order
        gather_idx = idx[..., None].expand(-1, -1, -1, keys.shape[-1])  # [B, H, budget, D]
        return (
            keys.gather(2, gather_idx),
            values.gather(2, idx[..., None].expand(-1, -1, -1, values.shape[-1])),
            scores.gather(2, idx),
            positions.gather(2, idx),
        )

    @property
    def stored_length(self) -> int:
        return 0 if self.scores is None else int(self.scores.shape[-1])

    def get_seq_length(self) -> int:
        """Tokens seen (not stored): generate() derives cache_position and RoPE positions from it."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The stored keys are not contiguous positions, but every one of them is visible to every new query; mapping
        # them to the `stored` positions just before the first new token keeps the causal mask among new tokens right.
        stored = self.stored_length
        return stored + query_length, self.seen - stored

    def get_max_length(self) -> int:
        return self.budget

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self.scores = self.positions = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("QFiltersCache cannot be cropped (evicted keys are gone); no assisted decoding")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys, self.values, self.scores, self.positions = (
                t.repeat_interleave(repeats, dim=0) for t in (self.keys, self.values, self.scores, self.positions)
            )

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            idx = indices.to(self.scores.device)
            self.keys, self.values, self.scores, self.positions = (
                t.index_select(0, idx) for t in (self.keys, self.values, self.scores, self.positions)
            )


class QFiltersCache(Cache):
    """KV cache that keeps at most ``budget`` keys per head in every compressible layer, chosen by ``scorer``.

    ``QFiltersCache(model, QFilterScorer(filters), budget=512)`` then
    ``model.generate(..., **cache_kwargs(model, cache))`` (plainly ``cache=cache`` on transformers >= 5.24).
    ``window`` most recent positions and ``n_sinks`` first ones are always kept; ``budget > window + n_sinks``.
    """

    def __init__(
        self,
        model_or_config: Any,
        scorer: Scorer,
        budget: int,
        window: int = 64,
        n_sinks: int = 0,
        uncompressed_layers: Sequence[int] = (),
    ) -> None:
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING

        check_budget(budget, window, n_sinks)
        if not isinstance(scorer, Scorer):
            raise TypeError(f"scorer must be a qfilters.scorers.Scorer, got {type(scorer).__name__}")
        scorer.check_model(*model_dims(model_or_config))
        kinds = layer_kinds(model_or_config, uncompressed_layers)
        _, layer_kwargs = _layer_types(_text_config(model_or_config))
        layers: list[Any] = []
        for idx, (kind, kw) in enumerate(zip(kinds, layer_kwargs)):
            if kind == "compress":
                layers.append(EvictingLayer(idx, scorer, budget, window, n_sinks))
            elif kind == "full":
                layers.append(DynamicLayer())
            elif kind in ("sliding_attention", "chunked_attention"):
                layers.append(DynamicSlidingWindowLayer(**kw))
            else:  # other layer kinds (linear attention, shared KV ...) stay as transformers builds them
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kw))
        super().__init__(layers=layers)
        self.scorer, self.budget, self.window, self.n_sinks = scorer, budget, window, n_sinks
        self.uncompressed_layers = tuple(sorted(set(uncompressed_layers)))

    def stored_lengths(self) -> list[int]:
        """Keys currently held per layer (per KV head), for inspection and tests."""
        return [int(layer.keys.shape[-2]) if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 else 0
                for layer in self.layers]
