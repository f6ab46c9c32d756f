"""Would a summary of the evicted keys close the gap? Scores fixed at entry decide WHICH keys stay; what is lost
with the others is their share of attention. This keeps one extra slot per KV head (so one fewer key, same memory):
the running mean of the evicted keys and values and their count n. Query t attends to it with logit
q.mean_k / sqrt(d) + log n, as if every evicted key had the mean key (Jensen: that underestimates their mass).
It is causal and O(d) per evicted key, so serving could keep it; a FlashAttention kernel would combine it through
the log-sum-exp it already returns. Measured with a dense patched one-pass hook on the shipped recipes and on
StreamingLLM, each with and without the slot, on the search text and held-out austen and python-docs.
Result (1 document per text, budget 128, evicted-bucket-1docs.json): the slot HURTS everywhere, uniform or weighted
by the calibrated mean query: austen 0.529 -> 0.895 (uniform) / 0.848 (weighted), StreamingLLM 1.0 -> 1.47 / 1.43.
Renormalising attention over the kept keys beats adding a coarse summary of the evicted ones. A dead end.
Usage: .venv/bin/python research/issue13/evicted_bucket.py artifacts/smollm2-handbook-en [budgets] [docs]
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file
from heldout import (
    HERE,
    held_out,
    measure,
    patch_eviction_hook,
    search_text,
    shipped_book,
    shipped_variant,
    streamingllm,
    with_policy_class,
)

from qfilters import QFilters, load_model
from qfilters.eviction import eviction_horizon
from qfilters.policy import EvictionPolicy, LayerwisePolicy


@dataclass(frozen=True)
class BucketPolicy(EvictionPolicy):
    """``budget - 1`` keys chosen as usual, plus the evicted keys' mean in the last slot; with ``mean_query``
    ([layers, kv heads, d], the calibration's mean post-RoPE query, group-averaged) the mean is weighted by each
    key's static exp(mean_query . k / sqrt d), and queries attend to it with log W + (q - mean_query) . k~."""

    mean_query: Any = None

    def horizon(self, scores: torch.Tensor) -> torch.Tensor:
        return eviction_horizon(scores, self.budget - 1 - self.window, self.window)

    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
               horizon: torch.Tensor) -> tuple[torch.Tensor, None]:
        mu = None if self.mean_query is None else self.mean_query[module.layer_idx].to(query.dtype)
        return bucket_attention(query, key, value, horizon, module.scaling, mu), None


def bucket_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, horizon: torch.Tensor,
                     scaling: float, mean_query: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention where query t sees key j iff j <= t <= horizon[j], plus the evicted keys' mean slot."""
    length = query.shape[2]
    rep = query.shape[1] // key.shape[1]
    t = torch.arange(length, device=query.device)
    causal = t[None, :] <= t[:, None]  # [T(query), T(key)]
    visible = causal & (t[:, None] <= horizon[..., None, :])  # [B, Hkv, T, T]
    evicted = (causal & ~visible).to(key.dtype)
    rep_kv = lambda x: x.repeat_interleave(rep, dim=1)  # noqa: E731
    if mean_query is None:
        static = torch.zeros(key.shape[:-1], dtype=key.dtype, device=key.device)  # [B, Hkv, T]
        shift = 0.0
    else:
        static = (key @ mean_query[None, :, :, None]).squeeze(-1) * scaling  # [B, Hkv, T]
        shift = rep_kv(mean_query[None, :, None, :])  # [1, Hq, 1, D]
    top = static.amax(-1, keepdim=True)
    weight = (static - top).exp()  # [B, Hkv, T]
    evicted_w = evicted * weight[..., None, :]
    count = evicted_w.sum(-1, keepdim=True)  # [B, Hkv, T, 1]: W (times exp(-top))
    mean_k = (evicted_w @ key) / count.clamp_min(1e-30)
    mean_v = (evicted_w @ value) / count.clamp_min(1e-30)
    any_evicted = evicted.sum(-1, keepdim=True) > 0
    k, v, vis = rep_kv(key), rep_kv(value), rep_kv(visible)
    logits = (query @ k.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~vis, float("-inf"))
    log_w = rep_kv(count.clamp_min(1e-30).log() + top[..., None])
    bucket = ((query - shift) * rep_kv(mean_k)).sum(-1, keepdim=True) * scaling + log_w
    bucket = bucket.masked_fill(~rep_kv(any_evicted), float("-inf"))
    weights = torch.cat([logits, bucket], dim=-1).softmax(-1)
    out = weights[..., :length] @ v + weights[..., length:] * rep_kv(mean_v)
    return out.transpose(1, 2).contiguous()  # [B, T, Hq, D]


def bucketed(policy: Any, mean_query: torch.Tensor | None = None) -> Any:
    if isinstance(policy, LayerwisePolicy):
        return with_policy_class(policy, BucketPolicy, mean_query=mean_query)
    return BucketPolicy(policy.scorer, policy.budget, policy.window, policy.n_sinks, mean_query=mean_query)


if __name__ == "__main__":
    patch_eviction_hook()
    filters = QFilters.from_pretrained(sys.argv[1])
    budgets = tuple(int(b) for b in sys.argv[2].split(",")) if len(sys.argv) > 2 else (64, 128, 256, 512)
    docs = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    book = shipped_book()
    stats = load_file(f"{sys.argv[1]}/query_stats.safetensors")
    mu = stats["mean"].float().reshape(30, 3, 3, -1).mean(2)  # [L, Hkv, D]: repeat_kv order
    lm = load_model("smollm2")
    policies: dict = {}
    for budget in budgets:
        policies["streamingllm", budget] = streamingllm(budget)
        policies["streamingllm + bucket", budget] = bucketed(streamingllm(budget))
        shipped = shipped_variant(book, budget, lm, filters)
        policies["shipped", budget] = shipped
        policies["shipped + bucket", budget] = bucketed(shipped)
        policies["shipped + weighted bucket", budget] = bucketed(shipped, mu)
        policies["streamingllm + weighted bucket", budget] = bucketed(streamingllm(budget), mu)
    out: dict = {"filters": sys.argv[1], "budgets": list(budgets), "docs": docs}
    texts = {"search text": search_text(lm), "austen": held_out(lm, "austen", docs),
             "python-docs": held_out(lm, "python-docs", docs)}
    measure(lm, texts, policies, out)
    (HERE / f"evicted-bucket{'' if docs == 6 else f'-{docs}docs'}.json").write_text(json.dumps(out, indent=1) + "\n")
