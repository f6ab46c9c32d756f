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


_pending = threading.local()  # layer index -> (bool [H_kv, S] keys to attend to, the cache layer that offered it)


def _pending_masks() -> dict[int, tuple[torch.Tensor, object]]:
    if not hasattr(_pending, "masks"):
        _pending.masks = {}
    return _pending.masks


def offer_key_mask(layer_idx: int, valid: torch.Tensor, owner: object) -> None:
    """Have the next attention call of layer ``layer_idx`` attend only to the keys ``valid`` ([H_kv, S] bool) marks.

    Called by a cache layer from ``update``, which transformers runs right before that layer's attention. A mask
    still pending from ``owner``'s previous step means that attention never went through qfilters (the model's
    attention implementation was changed back): the padded keys were attended to, so this raises.
    """
    masks = _pending_masks()
    stale = masks.get(layer_idx)
    if stale is not None and stale[1] is owner:
        del masks[layer_idx]
        raise ModelError(
            f"layer {layer_idx}'s attention did not run through qfilters, so per-head budgets were not applied: "
            "keep the attention implementation QFiltersCache set (qfilters+sdpa) while decoding with it"
        )
    masks[layer_idx] = (valid, owner)


def key_mask(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
             valid: torch.Tensor) -> torch.Tensor:
    """Additive float mask [B, H_q, T_q, S]: transformers' ``attention_mask`` (or causal among the last T_q keys
    where it gave none) AND the per-KV-head ``valid`` keys [H_kv, S]."""
    batch, q_heads, n_q = query.shape[:3]
    kv_heads, length = key.shape[1], key.shape[2]
    vis = valid.to(query.device)[None, :, None, :].expand(batch, kv_heads, n_q, length)
    base = torch.zeros(batch, kv_heads, n_q, length, dtype=query.dtype, device=query.device)
    if attention_mask is None:  # sdpa skipped its mask (is_causal): the new tokens are the last n_q keys
        vis = vis & torch.ones(n_q, length, dtype=torch.bool, device=query.device).tril(length - n_q)
    elif attention_mask.dtype == torch.bool:
        vis = vis & attention_mask[..., :length]
    else:
        base = base + attention_mask[..., :length].to(query.dtype)
    return base.masked_fill(~vis, torch.finfo(query.dtype).min).repeat_interleave(q_heads // kv_heads, dim=1)


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
        pending = _pending_masks().pop(getattr(module, "layer_idx", -1), None)
        if pending is not None:  # a cache with per-head budgets padded its heads to one length: hide the padding
            attention_mask = key_mask(query, key, attention_mask, pending[0])
            kwargs.pop("is_causal", None)
        hook = _active_hook.get()
        if hook is None:  # model left in our mode outside a context: behave exactly like the base kernel
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        return hook(module, query, key, value, attention_mask, base_fn=base_fn, **kwargs)

    AttentionInterface.register(name, dispatch)
    if base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def route_through_qfilters(model: PreTrainedModel, kernels: tuple[str, ...] = ("sdpa", "eager")) -> None:
    """Switch ``model`` to ``qfilters+<its kernel>`` for good: the same attention, plus the per-head key masks a cache
    offers. Only kernels that take an arbitrary 4-D mask can hide per-head padding."""
    if not hasattr(model, "set_attn_implementation"):
        raise ModelError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    base = _base_name(model.config._attn_implementation or "sdpa")
    if base not in kernels:
        raise ModelError(f"per-head budgets need attention that takes a per-head mask ({', '.join(kernels)}), not "
                         f"{base!r}: reload the model with attn_implementation='sdpa'")
    model.set_attn_implementation(_ensure_registered(base))


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
