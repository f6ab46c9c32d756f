"""Observe or alter a model's attention calls without touching its modeling code.

transformers 5 routes every attention call of modern causal LMs through ``AttentionInterface``: the attention module
computes post-RoPE (and post-QK-norm) queries and keys, then calls ``ALL_ATTENTION_FUNCTIONS[impl](module, q, k, v,
mask, **kw)``. We register one extra implementation per base kernel, ``"qfilters+<base>"``, that hands the call to
the hook active in the current context. Calibration (capture queries), and the one-pass evaluator (per-head eviction
masks) are such hooks. A cache whose KV heads store different numbers of keys (per-head budgets) pads them to one
length for each step and leaves a per-head key mask here (:func:`offer_key_mask`) that the dispatch applies, since
transformers' own mask is shared by all heads. The mask function of the base kernel is registered under the same
name: without it, models with sliding-window layers (Gemma-3) would silently get full attention.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from qfilters.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PREFIX = "qfilters+"

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


class AttentionModule(Protocol):
    """What transformers hands an attention function: one layer's self-attention module (an ``nn.Module``), which
    knows its layer index."""

    layer_idx: int


class AttentionHook(Protocol):
    """Called instead of the model's attention function; must return what ``base_fn`` returns."""

    def __call__(
        self,
        module: AttentionModule,
        query: torch.Tensor,  # [B, H_q, T_q, D], post-RoPE
        key: torch.Tensor,  # [B, H_kv, T_k, D], post-RoPE, already concatenated with any cache
        value: torch.Tensor,  # [B, H_kv, T_k, D_v]
        attention_mask: torch.Tensor | None,
        base_fn: AttentionFn,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


_active_hook: ContextVar[AttentionHook | None] = ContextVar("qfilters_attention_hook", default=None)


_pending = threading.local()  # layer index -> (bool [H_kv, S] keys to attend to, the keys tensor it describes)


def _pending_masks() -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    if not hasattr(_pending, "masks"):
        _pending.masks = {}
    return _pending.masks


def offer_key_mask(layer_idx: int, valid: torch.Tensor, keys: torch.Tensor) -> None:
    """Have layer ``layer_idx``'s next attention call attend only to the keys ``valid`` ([H_kv, S] bool) marks.

    Called by a cache layer from ``update``, which transformers runs right before that layer's attention; the mask
    applies only to the very ``keys`` tensor ``update`` returned, so one left behind by an aborted forward can never
    reach another call. Offer none where every key is valid: sdpa then keeps its own (causal) fast path.
    """
    _pending_masks()[layer_idx] = (valid, keys)


def withdraw_key_mask(layer_idx: int) -> None:
    """Drop what :func:`offer_key_mask` left for ``layer_idx`` (a cache reset)."""
    _pending_masks().pop(layer_idx, None)


def _take_key_mask(layer_idx: int, key: torch.Tensor) -> torch.Tensor | None:
    pending = _pending_masks().pop(layer_idx, None)
    if pending is None:
        return None
    valid, keys = pending
    same = key.data_ptr() == keys.data_ptr() and key.shape == keys.shape
    return valid if same else None


def key_mask(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
             valid: torch.Tensor) -> torch.Tensor:
    """bool mask [B, H_q, T_q, S] (True: attend): the stored keys (all but the last T_q) where ``valid`` [H_kv, S] says
    so, the new ones (the last T_q) as transformers' ``attention_mask`` says (its last T_q columns: the layers of a
    cache may store different numbers of keys, and its mask is sized for one of them), or causally where it gave none.
    Stored keys are visible to every new query: a cache that evicts supports no left padding."""
    batch, q_heads, n_q = query.shape[:3]
    kv_heads, length = key.shape[1], key.shape[2]
    vis = valid.to(query.device)[None, :, None, :].expand(batch, kv_heads, n_q, length).clone()
    if attention_mask is None:  # sdpa skipped its mask (is_causal): the new tokens are the last n_q keys
        new = torch.ones(n_q, n_q, dtype=torch.bool, device=query.device).tril()[None, None]
    else:
        given = attention_mask[..., -n_q:]
        new = given if given.dtype == torch.bool else given > torch.finfo(given.dtype).min / 2
    vis[..., length - n_q:] &= new
    return vis.repeat_interleave(q_heads // kv_heads, dim=1)


def _base_name(name: str) -> str:
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def _ensure_registered(base: str) -> str:
    """Register ``qfilters+<base>`` (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = PREFIX + base
    if name in ALL_ATTENTION_FUNCTIONS._global_mapping:
        return name
    if base not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        raise ModelError(
            f"attention implementation {base!r} is not one transformers can dispatch to; "
            "load the model with attn_implementation='sdpa' (or 'flash_attention_2' where installed)"
        )
    base_fn = ALL_ATTENTION_FUNCTIONS[base]

    def dispatch(module: AttentionModule, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        valid = _take_key_mask(getattr(module, "layer_idx", -1), key)
        if valid is not None:  # a cache with per-head budgets padded its heads to one length: hide the padding
            attention_mask = key_mask(query, key, attention_mask, valid)
            kwargs.pop("is_causal", None)
        hook = _active_hook.get()
        if hook is None:  # model left in our mode outside a context: behave exactly like the base kernel
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        return hook(module, query, key, value, attention_mask, base_fn=base_fn, **kwargs)

    AttentionInterface.register(name, dispatch)
    if base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def check_per_head_kernel(model_or_config: Any) -> None:
    """Raise unless the model's attention takes the per-head key mask a per-head cache needs (sdpa)."""
    config = getattr(model_or_config, "config", model_or_config)
    base = _base_name(getattr(config, "_attn_implementation", None) or "sdpa")
    if base != "sdpa":
        raise ModelError(f"per-head budgets need attention that takes a per-head key mask (sdpa), not {base!r}: "
                         "reload the model with attn_implementation='sdpa', or pass recipe=None for the stock policy")


def route_through_qfilters(model: PreTrainedModel) -> None:
    """Switch ``model`` to ``qfilters+sdpa`` for good: sdpa, plus the per-head key masks a cache offers."""
    if not hasattr(model, "set_attn_implementation"):
        raise ModelError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    check_per_head_kernel(model)
    model.set_attn_implementation(_ensure_registered("sdpa"))


def routed_through_qfilters(config: Any) -> bool:
    """Whether a model with this config runs its attention through qfilters (and so applies per-head key masks)."""
    return str(getattr(config, "_attn_implementation", None) or "").startswith(PREFIX)


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules that go through the attention interface, ordered by ``layer_idx``."""
    indexed = [(i, m) for m in model.modules()
               if isinstance(i := getattr(m, "layer_idx", None), int) and hasattr(m, "config")]
    indexed = [(i, m) for i, m in indexed
               if any(hasattr(m, p) for p in ("q_proj", "qkv_proj", "query_key_value", "c_attn"))]
    if not indexed:
        raise ModelError(
            f"{type(model).__name__} has no attention layers qfilters can observe (no module with a layer_idx and "
            "query projection); Q-Filters need a transformer causal LM"
        )
    return [m for _, m in sorted(indexed, key=lambda pair: pair[0])]


@contextmanager
def attention_hook(model: PreTrainedModel, hook: AttentionHook) -> Iterator[None]:
    """Route ``model``'s attention calls through ``hook`` inside the ``with`` block, then restore the model."""
    if not hasattr(model, "set_attn_implementation"):
        raise ModelError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    original = model.config._attn_implementation
    base = _base_name(original or "sdpa")
    name = _ensure_registered(base)
    model.set_attn_implementation(name)
    token = _active_hook.set(hook)
    try:
        yield
    finally:
        _active_hook.reset(token)
        model.set_attn_implementation(original)
