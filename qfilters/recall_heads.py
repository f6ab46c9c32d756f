"""Recall heads: the few KV heads through which a model reads a detail back out of its context.

Why: under the kvpress protocol a context is prefilled with full attention and compressed once, so the hidden states
of a passkey's tokens are exact; what compression takes away is the question's view of them. That view goes through
a handful of heads (Wu et al. 2024 call them retrieval heads). On SmolLM2 the answer's attention on the needle is
above 0.5 in 11 of 90 KV heads and below 0.05 in most: ranking old keys by content novelty in the top 8 alone keeps
more needles than novelty in half the layers, at a fraction of the perplexity (BENCHMARKS.md, "Recall heads").

:func:`needle_attention` measures each head's share once, on calibration text with the full cache (it computes the
attention weights itself, so the model may run SDPA); recipes store the table and name how many heads to switch
(:class:`qfilters.recipes.Recipe` ``recall_heads``). Eviction itself stays FlashAttention-compatible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from qfilters.architecture import compressed_layers, text_config
from qfilters.attention import AttentionFn, AttentionModule, attention_hook
from qfilters.passkey import PasskeyTrial, attention_weights

__all__ = ["needle_attention", "top_heads"]


class _NeedleReader:
    """Hook for the question + answer: per compressed layer, the attention mass the queries that predict the key's
    tokens put on the needle's tokens, per query head (mean over those queries). The attention output is the model's
    own (``base_fn``); the weights are recomputed beside it, causally (compressed layers attend to all they may)."""

    def __init__(self, needle: tuple[int, int], rows: slice, layers: set[int]) -> None:
        self.needle, self.rows, self.layers = needle, rows, layers
        self.mass: dict[int, Tensor] = {}

    def __call__(self, module: AttentionModule, query: Tensor, key: Tensor, value: Tensor,
                 attention_mask: Tensor | None, base_fn: AttentionFn, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        if module.layer_idx in self.layers:
            scaling = float(getattr(module, "scaling", query.shape[-1] ** -0.5))
            probs = attention_weights(query, key, scaling)[:, :, self.rows]  # [B, Hq, answer tokens, T]
            start, end = self.needle
            self.mass[module.layer_idx] = probs[..., start:end].sum(dim=-1).mean(dim=-1)[0].double()  # [Hq]
        return base_fn(module, query, key, value, attention_mask, **kwargs)


@torch.inference_mode()
def needle_attention(model: Any, trials: Sequence[PasskeyTrial],
                     progress: Callable[[int], None] | None = None) -> Tensor:
    """[num_layers, num_kv_heads] float64: per KV head, the attention its most needle-reading query head puts on the
    needle while the key is answered (teacher-forced, full cache), averaged over ``trials``; 0 in layers that are not
    compressed. ``trials`` should be built on calibration text (:func:`qfilters.passkey.make_trials`)."""
    from transformers import DynamicCache

    from qfilters.cache import cache_kwargs

    if not trials:
        raise ValueError("needle attention needs at least one passkey trial")
    config = text_config(model)
    n_kv = int(config.num_key_value_heads)
    layers = set(compressed_layers(model))
    device = next(model.parameters()).device
    total = torch.zeros(int(config.num_hidden_layers), n_kv, dtype=torch.float64)
    for done, trial in enumerate(trials, start=1):
        if trial.needle[1] <= trial.needle[0]:
            raise ValueError(f"trial with key {trial.key} does not say where its needle is")
        t_c, n_q, n_a = len(trial.context), len(trial.question), len(trial.answer)
        cache = DynamicCache(config=model.config)
        model(torch.tensor([trial.context], device=device), **cache_kwargs(model, cache), use_cache=True,
              logits_to_keep=1)
        reader = _NeedleReader(trial.needle, slice(n_q - 1, n_q - 1 + n_a), layers)
        positions = torch.arange(t_c, t_c + n_q + n_a, device=device)
        with attention_hook(model, reader):
            model(torch.tensor([trial.question + trial.answer], device=device), **cache_kwargs(model, cache),
                  use_cache=True, position_ids=positions[None], cache_position=positions, logits_to_keep=1)
        for layer, mass in reader.mass.items():
            total[layer] += mass.cpu().reshape(n_kv, -1).max(dim=-1).values
        if progress is not None:
            progress(done)
    return total / len(trials)


def top_heads(table: Any, count: int, layers: Sequence[int]) -> list[tuple[int, int]]:
    """The ``count`` (layer, KV head) pairs of ``layers`` with the highest ``table`` entries ([layer][KV head]),
    highest first; ties go to the earlier layer, then head, so the choice is deterministic."""
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    ranked = sorted((-float(table[i][h]), i, h) for i in layers for h in range(len(table[i])))
    if count > len(ranked):
        raise ValueError(f"asked for {count} recall heads but layers {list(layers)} have {len(ranked)} KV heads")
    return [(i, h) for _, i, h in ranked[:count]]
