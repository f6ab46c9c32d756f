"""Perplexity under KV-cache eviction: the exact one-pass evaluator and its token-by-token reference.

The reference is what serving does: decode one token at a time with :class:`QFiltersCache`, which evicts after every
step. Because scores are static per key, which keys each query sees has a closed form (``qfilters.eviction``), so
:func:`perplexity` gets the *same* numbers from ONE forward pass: inside each compressible layer it scores that
layer's keys (computed, as in decoding, from the masked earlier layers) and attends under the per-head visibility
mask (applied block by block over the keys each block of queries can see, see :func:`evicted_attention`). At 2048
tokens that is one batched pass instead of 2048 sequential ones.

Scoring convention: the perplexity of a sequence is ``exp(mean NLL)`` of its last ``score_last`` tokens (all but the
first token when ``None``), each predicted from everything before it under the eviction policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qfilters.architecture import COMPRESS, layer_kinds
from qfilters.attention import AttentionFn, AttentionHook, AttentionModule, attention_hook
from qfilters.errors import ModelError
from qfilters.policy import EvictionPolicy, LayerwisePolicy, PolicyLike

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel

__all__ = ["PerplexityResult", "eviction_hook", "evicted_attention", "perplexity", "perplexity_reference",
           "scored_tokens"]

MASKABLE_KERNELS = ("sdpa",)  # kernels that take an arbitrary 4-D mask AND that qfilters.attention can hook


@dataclass
class PerplexityResult:
    """Summed NLL over scored tokens (pooled over the batch) and the same per sequence."""

    nll_sum: float
    n_tokens: int
    per_sequence: list[tuple[float, int]] = field(default_factory=list)  # (nll_sum, n_tokens) per batch row

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens)

    @property
    def per_sequence_perplexity(self) -> list[float]:
        return [math.exp(nll / n) for nll, n in self.per_sequence]


def scored_tokens(length: int, score_last: int | None) -> int:
    """How many tokens of a ``length``-token sequence are scored (ValueError when ``score_last`` cannot be)."""
    if length < 2:
        raise ValueError(f"need at least 2 tokens to score a prediction, got a sequence of {length}")
    if score_last is None:
        return length - 1
    if isinstance(score_last, bool) or not isinstance(score_last, int) or not 1 <= score_last <= length - 1:
        raise ValueError(f"score_last must be an integer in [1, {length - 1}] for sequences of {length} tokens, "
                         f"got {score_last!r}")
    return score_last


def nll_result(logits: Tensor, targets: Tensor) -> PerplexityResult:
    """logits [B, n, V] predicting targets [B, n] -> NLL sums (float32 / float64 accumulation)."""
    batch, n, vocab = logits.shape
    flat = F.cross_entropy(logits.reshape(batch * n, vocab).float(), targets.reshape(batch * n), reduction="none")
    nll = flat.view(batch, n).double().sum(dim=1)  # [B]
    per = [(float(x), n) for x in nll.tolist()]
    return PerplexityResult(nll_sum=float(nll.sum()), n_tokens=n * len(per), per_sequence=per)


def _block_size(budget: int) -> int:
    # work ~ T * (budget + block), kernel calls ~ T / block: a block of about the budget balances the two
    return min(1024, max(128, budget))


def _given_block(given: Tensor, t0: int, t1: int, idx: Tensor) -> Tensor:
    """Rows t0:t1 of transformers' mask [b, h, T, T'], columns idx [B, H_kv, n] -> [B, H_kv, t1 - t0, n]."""
    rows = given[..., t0:t1, :]
    rows = rows.expand(idx.shape[0], idx.shape[1], rows.shape[-2], rows.shape[-1])
    return rows.gather(-1, idx[..., None, :].expand(-1, -1, t1 - t0, -1))


def evicted_attention(
    module: AttentionModule, query: Tensor, key: Tensor, value: Tensor, given_mask: Tensor | None, horizon: Tensor,
    base_fn: AttentionFn, block: int, **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention where query t sees key j iff j <= t <= horizon[j], by blocks of queries over compacted keys.

    Visibility of a key is an interval of queries, so a block [t0, t1) needs only the keys with j < t1 and
    horizon >= t0: at most budget + block of them. Gathering those per KV head (padded to the largest count, padding
    masked) costs O(T * (budget + block)) instead of a dense [T, T] mask, and never holds a T x T tensor.
    """
    q_heads, length = query.shape[1], query.shape[2]
    rep = q_heads // key.shape[1]  # repeat_kv order: query head h reads KV head h // rep
    t_all = torch.arange(length, device=query.device)
    outputs = []
    for t0 in range(0, length, block):
        t1 = min(length, t0 + block)
        relevant = horizon[..., :t1] >= t0  # [B, H_kv, t1]: keys some query of the block sees
        n = int(relevant.sum(dim=-1).max())
        # [B, H_kv, n]: indices of the relevant keys first, in position order (stable sort), then padding
        idx = torch.sort((~relevant).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
        valid = relevant.gather(-1, idx)  # [B, H_kv, n]: False on padding
        k_blk = key.gather(2, idx[..., None].expand(-1, -1, -1, key.shape[-1]))  # [B, H_kv, n, D]
        v_blk = value.gather(2, idx[..., None].expand(-1, -1, -1, value.shape[-1]))  # [B, H_kv, n, Dv]
        tq = t_all[t0:t1, None]  # [Tb, 1]
        vis = valid[..., None, :] & (idx[..., None, :] <= tq) & (tq <= horizon.gather(-1, idx)[..., None, :])
        # additive float mask: sdpa converts bool masks to this anyway, and eager-style kernels need it
        if given_mask is None:
            mask = torch.zeros(vis.shape, dtype=query.dtype, device=query.device)
        else:  # padding or other constraints transformers put in its own mask
            given = _given_block(given_mask, t0, t1, idx)  # [B, H_kv, Tb, n]
            mask = given.to(query.dtype) if given.is_floating_point() else torch.zeros(
                vis.shape, dtype=query.dtype, device=query.device)
            vis = vis if given.is_floating_point() else vis & given
        mask = mask.masked_fill(~vis, torch.finfo(query.dtype).min).repeat_interleave(rep, dim=1)  # [B, H_q, Tb, n]
        out, _ = base_fn(module, query[:, :, t0:t1], k_blk, v_blk, mask, **kwargs)  # [B, Tb, H_q, Dv]
        if out.shape[1] != t1 - t0:
            raise ModelError(f"attention kernel returned shape {tuple(out.shape)}; expected [B, T, H, D] outputs")
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def eviction_hook(model: PreTrainedModel, policy: PolicyLike) -> AttentionHook:
    """Attention hook applying greedy eviction to the layers ``policy`` compresses (others untouched)."""
    kinds = layer_kinds(model)

    def hook(module: AttentionModule, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
             base_fn: AttentionFn, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        layer = policy.for_layer(module.layer_idx) if kinds[module.layer_idx] == COMPRESS else None
        if layer is None:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        length = query.shape[2]
        if key.shape[2] != length:
            raise ModelError("the one-pass evaluator needs a cache-free forward (queries and keys of equal length)")
        positions = torch.arange(length, device=key.device)
        # scores of THIS layer's post-RoPE keys, computed from the evicted earlier layers exactly as in decoding
        scores = layer.scores(key, module.layer_idx, positions)  # [B, Hkv, T]
        horizon = layer.horizon(scores)  # [B, Hkv, T]
        kwargs.pop("is_causal", None)  # the mask says everything; never let the kernel add its own causal mask
        return evicted_attention(module, query, key, value, attention_mask, horizon, base_fn,
                                 _block_size(layer.budget), **kwargs)

    return hook


def _check_inputs(model: PreTrainedModel, input_ids: Tensor, policy: PolicyLike | None) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if policy is not None:
        if not isinstance(policy, (EvictionPolicy, LayerwisePolicy)):
            raise TypeError(f"policy must be an EvictionPolicy, a LayerwisePolicy or None (full cache), "
                            f"got {type(policy).__name__}")
        policy.check_model(model)


@torch.inference_mode()
def perplexity(model: PreTrainedModel, input_ids: Tensor, policy: PolicyLike | None, score_last: int | None = None
               ) -> PerplexityResult:
    """Exact perplexity of token-by-token decoding under ``policy``, in one forward pass (``None``: full cache).

    Sequences that fit every compressing layer's budget never evict, so they take the plain forward (bit-identical
    to full cache). Needs an sdpa model (flash kernels take no arbitrary mask); the reference runs with any kernel.
    """
    _check_inputs(model, input_ids, policy)
    length = input_ids.shape[1]
    n = scored_tokens(length, score_last)
    input_ids = input_ids.to(next(model.parameters()).device)
    if policy is None or length <= policy.min_budget:
        logits = model(input_ids, use_cache=False, logits_to_keep=n + 1).logits
    else:
        impl = str(model.config._attn_implementation).removeprefix("qfilters+")
        if impl not in MASKABLE_KERNELS:
            raise ModelError(f"the one-pass evaluator needs attn_implementation 'sdpa', not {impl!r}: "
                             "reload the model with attn_implementation='sdpa'")
        with attention_hook(model, eviction_hook(model, policy)):
            logits = model(input_ids, use_cache=False, logits_to_keep=n + 1).logits
    return nll_result(logits[:, :n], input_ids[:, length - n :])  # logits [B, n+1, V]: the last predicts nothing


@torch.inference_mode()
def perplexity_reference(
    model: PreTrainedModel, input_ids: Tensor, policy: PolicyLike | None, score_last: int | None = None
) -> PerplexityResult:
    """Same quantity as :func:`perplexity`, by decoding one token at a time with :class:`QFiltersCache` (slow)."""
    from transformers import DynamicCache

    from qfilters.cache import QFiltersCache, cache_kwargs

    _check_inputs(model, input_ids, policy)
    length = input_ids.shape[1]
    n = scored_tokens(length, score_last)
    input_ids = input_ids.to(next(model.parameters()).device)
    cache: Cache = DynamicCache(config=model.config) if policy is None else QFiltersCache(model, policy)
    skip_head = torch.empty(0, dtype=torch.long, device=input_ids.device)  # no LM head on unscored steps
    pass_cache = cache_kwargs(model, cache)
    logits = []
    for t in range(length - 1):
        scored = t >= length - 1 - n
        out = model(input_ids[:, t : t + 1], **pass_cache, use_cache=True,
                    logits_to_keep=1 if scored else skip_head)
        if scored:
            logits.append(out.logits[:, -1])  # [B, V] predicts token t + 1
    return nll_result(torch.stack(logits, dim=1), input_ids[:, length - n :])
