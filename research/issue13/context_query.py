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
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.scorers import QFilterScorer

BUDGETS = (64, 128)
MIXES = {"context": 1.0, "mix": 0.5}  # share of the context direction in the Q-Filters part of the score


@dataclass(frozen=True)
class ContextPolicy(EvictionPolicy):
    qfilters: Any = None  # the QFilterScorer whose part of the shipped score is swapped
    share: float = 1.0

    def adjust_scores(self, scores: torch.Tensor, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor) -> torch.Tensor:
        stock = self.qfilters.score(key, layer_idx, torch.arange(key.shape[2], device=key.device))
        return scores + self.share * (context_scores(query, key) - stock)


def with_context(policy: LayerwisePolicy, qfilters: QFilterScorer, share: float) -> LayerwisePolicy:
    return with_policy_class(policy, ContextPolicy, qfilters=qfilters, share=share)


def context_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """unit(running sum of the KV head's group of queries, positions <= j) . k_j -> [B, H_kv, T] float32."""
    batch, q_heads, length, dim = query.shape
    kv = key.shape[1]
    group = query.double().view(batch, kv, q_heads // kv, length, dim).sum(2).cumsum(2)  # [B, H_kv, T, D]
    direction = group / group.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return (direction * key.double()).sum(-1).float()


if __name__ == "__main__":
    patch_eviction_hook()
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
