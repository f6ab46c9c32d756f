"""Would the context's own queries beat the calibrated direction? Q-Filters score a key by its projection on the
dominant query direction of CALIBRATION text; at run time the model computes this document's queries anyway. Per layer
and KV head, d_j = unit(sum of the group's post-RoPE queries at positions <= j) is causal, so a key's score d_j . k_j
is fixed when it enters the cache (static per key: the one-pass evaluator stays exact). The shipped recipes at 64 and
128 with the Q-Filters part of the score replaced by it ("context"), or by the mean of the two ("mix"), on the search
text and held-out austen and python-docs. A diagnostic with a patched one-pass hook (the cache sees no queries), not
a search.
Usage: .venv/bin/python research/issue13/context_query.py artifacts/smollm2-handbook-en -> context-query.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import torch
from heldout import HERE, held_out, measure, search_text, shipped_book, shipped_variant, streamingllm

from qfilters import QFilters, load_model, onepass
from qfilters.architecture import COMPRESS, layer_kinds
from qfilters.eviction import eviction_horizon
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.scorers import QFilterScorer

BUDGETS = (64, 128)
MIXES = {"context": 1.0, "mix": 0.5}  # share of the context direction in the Q-Filters part of the score


@dataclass(frozen=True)
class ContextPolicy(EvictionPolicy):
    qfilters: Any = None  # the QFilterScorer whose part of the shipped score is swapped
    share: float = 1.0


def with_context(policy: LayerwisePolicy, qfilters: QFilterScorer, share: float) -> LayerwisePolicy:
    return LayerwisePolicy({i: None if p is None else ContextPolicy(p.scorer, p.budget, p.window, p.n_sinks,
                                                                     qfilters=qfilters, share=share)
                            for i, p in policy.layers.items()})


def context_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """unit(running sum of the KV head's group of queries, positions <= j) . k_j -> [B, H_kv, T] float32."""
    batch, q_heads, length, dim = query.shape
    kv = key.shape[1]
    group = query.double().view(batch, kv, q_heads // kv, length, dim).sum(2).cumsum(2)  # [B, H_kv, T, D]
    direction = group / group.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return (direction * key.double()).sum(-1).float()


def hook_context(model: Any, policy: Any) -> Any:
    kinds = layer_kinds(model)

    def hook(module, query, key, value, attention_mask, base_fn, **kwargs):
        layer = policy.for_layer(module.layer_idx) if kinds[module.layer_idx] == COMPRESS else None
        if layer is None:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        positions = torch.arange(query.shape[2], device=key.device)
        scores = layer.scores(key, module.layer_idx, positions)
        if isinstance(layer, ContextPolicy):
            stock = layer.qfilters.score(key, module.layer_idx, positions)
            scores = scores + layer.share * (context_scores(query, key) - stock)
        horizon = eviction_horizon(scores, layer.budget - layer.window, layer.window)
        kwargs.pop("is_causal", None)
        return onepass.evicted_attention(module, query, key, value, attention_mask, horizon, base_fn,
                                         onepass._block_size(layer.budget), **kwargs)

    return hook


if __name__ == "__main__":
    onepass.eviction_hook = hook_context
    filters = QFilters.from_pretrained(sys.argv[1])
    qf = QFilterScorer(filters)
    book = shipped_book()
    lm = load_model("smollm2")
    policies: dict = {}
    for budget in BUDGETS:
        shipped = shipped_variant(book, budget, lm, filters)
        policies["streamingllm", budget] = streamingllm(budget)
        policies["shipped", budget] = shipped
        for name, share in MIXES.items():
            policies[f"shipped, {name}", budget] = with_context(shipped, qf, share)
    out: dict = {"filters": sys.argv[1], "budgets": list(BUDGETS), "mixes": MIXES}
    texts = {"search text": search_text(lm), "austen": held_out(lm, "austen"),
             "python-docs": held_out(lm, "python-docs")}
    measure(lm, texts, policies, out)
    (HERE / "context-query.json").write_text(json.dumps(out, indent=1) + "\n")
