"""A transformers 5 ``Cache`` that evicts keys by score: Q-Filters (or any ``Scorer``) for ``model.generate()``.

Full-attention layers get an :class:`EvictingLayer`: each step attends to everything stored plus the new keys, then
the stored state is cut back to ``budget`` keys per KV head (policy in ``qfilters.eviction``, identical to what the
one-pass evaluator computes). Sliding-window layers keep transformers' own ``DynamicSlidingWindowLayer`` (already
bounded), layers listed in ``uncompressed_layers`` a plain ``DynamicLayer``.

Scores are static per key, so each key is scored once, on arrival, and its score is stored next to it: eviction is
a sort over at most ``budget + new`` stored scores, never a rescoring of the cache.

A layer whose KV heads keep different numbers of keys (a per-head recipe) stores each head's keys apart, so memory is
the sum of the heads' budgets; each step pads them to one length and hides the padding with a per-head key mask
(:func:`qfilters.attention.offer_key_mask`): the model's attention then runs as ``qfilters+sdpa``, which
:class:`QFiltersCache` switches it to. flash-attn takes no such mask; such recipes need sdpa. A step that must mask
(some head shorter than another) materializes a [B, H_q, new tokens, stored + new] bool mask: nothing for decoding,
but a long chunk prefilled onto a full cache pays for it (the first prefill offers none and keeps sdpa's causal path).

Limitations: no left padding (stored keys are not contiguous positions, so transformers' 2-D padding mask cannot be
mapped onto them), no ``crop`` (assisted decoding), and with ``uncompressed_layers`` the full-attention layers hold
different lengths, which only works where transformers skips the materialized mask (sdpa / flash without padding:
plain ``generate()`` and token-by-token decoding).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from qfilters.architecture import COMPRESS, KEPT_WHOLE, layer_kinds, layer_types
from qfilters.errors import ModelError
from qfilters.eviction import select_kept
from qfilters.policy import EvictionPolicy, LayerwisePolicy, PolicyLike
from qfilters.scorers import Scorer

if TYPE_CHECKING:
    from qfilters.artifact import QFilters
    from qfilters.recipes import Recipe, RecipeBook

__all__ = ["EvictingLayer", "QFiltersCache", "RaggedEvictingLayer", "cache_kwargs"]


def cache_kwargs(model: Any, cache: Cache) -> dict[str, Cache]:
    """The keyword that hands ``cache`` to ``model(...)`` or ``model.generate(...)``: ``cache`` from transformers
    5.24 on, ``past_key_values`` before (deprecated since, removed in 5.40)."""
    forward = getattr(model, "forward", None)
    try:
        takes_cache = forward is not None and "cache" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes_cache = False
    return {"cache": cache} if takes_cache else {"past_key_values": cache}


class EvictingLayer(DynamicLayer):
    """One full-attention layer's cache, bounded to ``budget`` keys per KV head.

    Stored (in position order): ``keys``/``values`` [B, H, S, D], ``scores`` [B, H, S] float32 and ``positions``
    [B, H, S] long (absolute positions; each head keeps its own set). ``seen`` = tokens received so far.
    """

    is_croppable = False

    def __init__(self, layer_idx: int, policy: EvictionPolicy) -> None:
        super().__init__()
        if not isinstance(policy, EvictionPolicy):
            raise TypeError(f"policy must be an EvictionPolicy, got {type(policy).__name__}")
        self.layer_idx, self.policy = layer_idx, policy
        self.seen = 0
        self.scores: Tensor | None = None
        self.positions: Tensor | None = None
        self.score_state: Tensor | None = None  # a causal scorer's running state (batch first), None if static

    @property
    def budget(self) -> int:
        return self.policy.budget

    @property
    def window(self) -> int:
        return self.policy.window

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
        new_scores, self.score_state = self.policy.scores_stream(key_states, self.layer_idx, new_pos,
                                                                 self.score_state)
        self.seen += n_new

        # set by lazy_initialization, cleared only by reset() (which clears is_initialized too)
        assert self.keys is not None and self.values is not None
        assert self.scores is not None and self.positions is not None
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
        self.scores = self.positions = self.score_state = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("QFiltersCache cannot be cropped (evicted keys are gone); no assisted decoding")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            assert self.keys is not None and self.values is not None
            assert self.scores is not None and self.positions is not None
            self.keys, self.values, self.scores, self.positions = (
                t.repeat_interleave(repeats, dim=0) for t in (self.keys, self.values, self.scores, self.positions)
            )
            if self.score_state is not None:
                self.score_state = self.score_state.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            assert self.keys is not None and self.values is not None
            assert self.scores is not None and self.positions is not None
            idx = indices.to(self.scores.device)
            self.keys, self.values, self.scores, self.positions = (
                t.index_select(0, idx) for t in (self.keys, self.values, self.scores, self.positions)
            )
            if self.score_state is not None:
                self.score_state = self.score_state.index_select(0, idx.to(self.score_state.device))


class RaggedEvictingLayer(EvictingLayer):
    """An :class:`EvictingLayer` whose KV head ``h`` keeps its own budget and window (``policy.head_limits``).

    Each head's keys, values, scores and positions are stored apart (``head_keys[h]`` [B, S_h, D] ...): the layer holds
    the sum of the heads' budgets, not the widest times the head count. ``keys``/``values`` stay empty.
    """

    def __init__(self, layer_idx: int, policy: EvictionPolicy, config: Any = None) -> None:
        super().__init__(layer_idx, policy)
        self.config = config  # the model's: its attention must stay routed through qfilters (None: not checked)
        self.limits: list[tuple[int, int]] = []  # (budget, window) per KV head, once the head count is known
        self.head_keys: list[Tensor] = []
        self.head_values: list[Tensor] = []
        self.head_scores: list[Tensor] = []
        self.head_positions: list[Tensor] = []

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads = key_states.shape[:2]
        self.limits = self.policy.head_limits(heads)
        self.head_keys = [key_states.new_empty(batch, 0, key_states.shape[-1]) for _ in range(heads)]
        self.head_values = [value_states.new_empty(batch, 0, value_states.shape[-1]) for _ in range(heads)]
        self.head_scores = [torch.empty(batch, 0, dtype=torch.float32, device=self.device) for _ in range(heads)]
        self.head_positions = [torch.empty(batch, 0, dtype=torch.long, device=self.device) for _ in range(heads)]

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Stored + new keys/values of every head, padded to the longest head (the padding masked for attention),
        then each head evicted to its own budget."""
        from qfilters.attention import offer_key_mask, routed_through_qfilters

        if self.config is not None and not routed_through_qfilters(self.config):
            raise ModelError(
                f"the model's attention implementation is {self.config._attn_implementation!r}: a cache whose KV heads "
                "keep different budgets needs qfilters+sdpa (which QFiltersCache set) to mask each head's padding; "
                "keep it while decoding with this cache"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, n_new, _ = key_states.shape
        new_pos = torch.arange(self.seen, self.seen + n_new, device=key_states.device)
        new_scores, self.score_state = self.policy.scores_stream(key_states, self.layer_idx, new_pos,
                                                                 self.score_state)
        self.seen += n_new
        width = self.stored_length
        keys = key_states.new_zeros(batch, heads, width + n_new, key_states.shape[-1])
        values = value_states.new_zeros(batch, heads, width + n_new, value_states.shape[-1])
        valid = torch.zeros(heads, width + n_new, dtype=torch.bool, device=key_states.device)
        keys[:, :, width:], values[:, :, width:], valid[:, width:] = key_states, value_states, True
        for h, (budget, window) in enumerate(self.limits):
            stored = self.head_keys[h].shape[1]
            keys[:, h, :stored], values[:, h, :stored], valid[h, :stored] = (
                self.head_keys[h], self.head_values[h], True)
            merged = (torch.cat([self.head_keys[h], key_states[:, h]], dim=1),
                      torch.cat([self.head_values[h], value_states[:, h]], dim=1),
                      torch.cat([self.head_scores[h], new_scores[:, h]], dim=1),
                      torch.cat([self.head_positions[h], new_pos.expand(batch, n_new)], dim=1))
            self.head_keys[h], self.head_values[h], self.head_scores[h], self.head_positions[h] = _evict_head(
                *merged, budget, window)
        if not bool(valid.all()):
            offer_key_mask(self.layer_idx, valid, keys)
        return keys, values

    @property
    def stored_length(self) -> int:
        """The longest head's stored keys: the width attention sees (shorter heads are padded and masked)."""
        return max((k.shape[1] for k in self.head_keys), default=0)

    @property
    def stored_per_head(self) -> list[int]:
        """Keys each KV head stores now (per sequence)."""
        return [k.shape[1] for k in self.head_keys]

    def get_max_length(self) -> int:
        return self.budget

    def reset(self) -> None:
        from qfilters.attention import withdraw_key_mask

        super().reset()
        self.head_keys, self.head_values, self.head_scores, self.head_positions = [], [], [], []
        withdraw_key_mask(self.layer_idx)

    def _per_head(self, op: Any) -> None:
        for name in ("head_keys", "head_values", "head_scores", "head_positions"):
            setattr(self, name, [op(t) for t in getattr(self, name)])
        if self.score_state is not None:
            self.score_state = op(self.score_state)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._per_head(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            self._per_head(lambda t: t.index_select(0, indices.to(t.device)))


def _evict_head(keys: Tensor, values: Tensor, scores: Tensor, positions: Tensor, budget: int, window: int
                ) -> tuple[Tensor, ...]:
    """One head's stored state ([B, S, ...], position order) cut back to ``budget``: the window + the best old keys."""
    stored = scores.shape[-1]
    if stored <= budget:
        return keys, values, scores, positions
    n_old = stored - window
    kept = select_kept(scores[:, None, :n_old], budget - window)[:, 0]  # [B, budget - W]
    idx = torch.cat([kept, torch.arange(n_old, stored, device=scores.device).expand(kept.shape[0], window)], dim=-1)
    return (keys.gather(1, idx[..., None].expand(-1, -1, keys.shape[-1])),
            values.gather(1, idx[..., None].expand(-1, -1, values.shape[-1])),
            scores.gather(1, idx), positions.gather(1, idx))


class QFiltersCache(Cache):
    """KV cache that keeps at most ``budget`` keys per head in every compressible layer, as an eviction policy says.

    ``QFiltersCache(model, EvictionPolicy(QFilterScorer(filters), budget=512))``, or with the policy's fields inline:
    ``QFiltersCache(model, QFilterScorer(filters), budget=512, window=64)``; then
    ``model.generate(..., **cache_kwargs(model, cache))`` (plainly ``cache=cache`` on transformers >= 5.24).
    A :class:`~qfilters.policy.LayerwisePolicy` gives each layer its own budget, window, sinks and scorer.

    ``QFiltersCache(model, filters, budget=256)`` with a :class:`~qfilters.artifact.QFilters` uses the eviction recipe
    its validation chose (``filters.recipe``, stored in ``qfilters.json``) at that budget; ``recipe=None`` gives the
    stock policy instead (Q-Filters, window 64, no sinks), and so do filters without a recipe. Under a recipe the
    budget is the MEAN over compressed layers (the same total memory; a pyramid gives early layers more), and
    ``window``/``n_sinks`` come from the recipe, so passing them too is an error. ``context_length`` is only needed
    by a recipe that keeps layers whole (they are paid for at that many tokens; default: the searched length).

    A policy whose KV heads keep different budgets (``EvictionPolicy.per_head``, a recipe allocated by KV head) stores
    them ragged and switches ``model`` to ``attn_implementation="qfilters+sdpa"``: sdpa with the cache's per-head key
    mask, identical to sdpa wherever no such cache is in use. It needs the model (not its config) and sdpa.
    """

    def __init__(
        self,
        model_or_config: Any,
        policy: PolicyLike | Scorer | QFilters,
        budget: int | None = None,
        window: int | None = None,
        n_sinks: int | None = None,
        uncompressed_layers: Sequence[int] | None = None,
        *,
        recipe: RecipeBook | Recipe | None | Literal["stored"] = "stored",
        context_length: int | None = None,
    ) -> None:
        from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING

        from qfilters.artifact import QFilters

        if isinstance(policy, QFilters):
            policy = _filters_policy(model_or_config, policy, budget, window, n_sinks, uncompressed_layers, recipe,
                                     context_length)
        elif recipe != "stored" or context_length is not None:
            raise TypeError("recipe= and context_length= apply to a QFilters filter set, not to a scorer or policy")
        else:
            policy = _as_policy(policy, budget, window, n_sinks, uncompressed_layers)
        policy.check_model(model_or_config)
        per_head = _has_per_head_layers(policy, model_or_config)
        if per_head:
            from qfilters.attention import check_per_head_kernel

            if not hasattr(model_or_config, "set_attn_implementation"):
                raise TypeError("this policy gives KV heads different budgets: build QFiltersCache from the model, "
                                "not its config (its attention must run through qfilters to mask per head)")
            check_per_head_kernel(model_or_config)
        _, layer_kwargs = layer_types(model_or_config)
        layers: list[Any] = []
        for idx, (kind, kw) in enumerate(zip(layer_kinds(model_or_config), layer_kwargs, strict=True)):
            layer_policy = policy.for_layer(idx) if kind == COMPRESS else None
            if layer_policy is not None:
                layers.append(RaggedEvictingLayer(idx, layer_policy, model_or_config.config) if layer_policy.is_per_head
                              else EvictingLayer(idx, layer_policy))
            elif kind in (COMPRESS, KEPT_WHOLE):
                layers.append(DynamicLayer())
            elif kind in ("sliding_attention", "chunked_attention"):
                layers.append(DynamicSlidingWindowLayer(**kw))
            else:  # other layer kinds (linear attention, shared KV ...) stay as transformers builds them
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kw))
        super().__init__(layers=layers)
        self.policy = policy
        if per_head:  # last: a cache that failed to build leaves the model as it was
            from qfilters.attention import route_through_qfilters

            route_through_qfilters(model_or_config)


def _has_per_head_layers(policy: PolicyLike, model_or_config: Any) -> bool:
    kinds = layer_kinds(model_or_config)
    return any(p is not None and p.is_per_head
               for p in (policy.for_layer(i) for i, kind in enumerate(kinds) if kind == COMPRESS))


def _filters_policy(model_or_config: Any, filters: QFilters, budget: int | None, window: int | None,
                    n_sinks: int | None, uncompressed_layers: Sequence[int] | None,
                    recipe: RecipeBook | Recipe | None | Literal["stored"], context_length: int | None) -> PolicyLike:
    """The policy of a filter set at ``budget``: its stored recipe (or the one given), else the stock one."""
    from qfilters.policy_table import ScorerInputs
    from qfilters.recipes import Recipe, RecipeBook
    from qfilters.scorers import QFilterScorer

    if budget is None:
        raise TypeError("a budget is needed: QFiltersCache(model, filters, budget=512)")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be an int (keys per KV head), got {budget!r}")
    stored = filters.recipe
    book = stored if recipe == "stored" else recipe
    if isinstance(book, Recipe):  # the stored tables (sensitivities, spreads, needles) serve a given recipe too
        book = RecipeBook({budget: book}) if stored is None else dataclasses.replace(stored, by_budget={budget: book})
    if book is None:
        if context_length is not None:
            raise TypeError("context_length applies to a recipe that keeps layers whole; the stock policy has none")
        return _as_policy(QFilterScorer(filters), budget, window, n_sinks, uncompressed_layers)
    inline = sorted(k for k, v in {"window": window, "n_sinks": n_sinks,
                                    "uncompressed_layers": uncompressed_layers}.items() if v is not None)
    if inline:
        raise TypeError(f"{', '.join(inline)} would override the filter set's recipe: pass recipe=None to set "
                        "them yourself, or a Recipe")
    if not isinstance(book, RecipeBook):
        raise TypeError(f"recipe must be 'stored', None, a Recipe or a RecipeBook, got {type(book).__name__}")
    return book.policy(budget, model_or_config, ScorerInputs(filters=filters), context_length)


def _as_policy(policy: PolicyLike | Scorer, budget: int | None, window: int | None, n_sinks: int | None,
               uncompressed_layers: Sequence[int] | None) -> PolicyLike:
    """A policy as given, or the policy of a scorer and inline fields (window 64 and no sinks by default)."""
    inline = {"budget": budget, "window": window, "n_sinks": n_sinks, "uncompressed_layers": uncompressed_layers}
    if isinstance(policy, (EvictionPolicy, LayerwisePolicy)):
        given = sorted(k for k, v in inline.items() if v is not None)
        if given:
            raise TypeError(f"pass {', '.join(given)} inside the policy, not next to it")
        return policy
    if not isinstance(policy, Scorer):
        raise TypeError(f"scorer must be a qfilters.scorers.Scorer or an EvictionPolicy, got {type(policy).__name__}")
    if budget is None:
        raise TypeError("a budget is needed: QFiltersCache(model, scorer, budget=512)")
    return EvictionPolicy(policy, budget, 64 if window is None else window, n_sinks or 0,
                          tuple(uncompressed_layers or ()))
