"""Per-head budgets (AdaKV-style), measured before anyone builds them into the cache: at each layer the heads share
one pool of H x (budget - window) old-key slots, filled by the best keys of all heads, each head's scores in units of
its Q-Filters spread (the unit the recipes already use); each head keeps its own recent window. Same total KV memory.
The shipped recipes at 64 and 128, on the search text and held-out austen and python-docs. A diagnostic with a
patched one-pass hook (QFiltersCache stores the same number of keys per head), not a search.
Usage: .venv/bin/python research/issue13/head_pool.py artifacts/smollm2-handbook-en [--centred]
  -> head-pool.json (--centred: each head's scores minus its running mean too -> head-pool-centred.json)
(The committed head-pool.json holds the rows of a run stopped before python-docs, copied from its log.)
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
from qfilters.eviction import eviction_horizon
from qfilters.policy import EvictionPolicy, LayerwisePolicy

BUDGETS = (64, 128)
CENTRED = "--centred" in sys.argv  # each head's scores minus its running mean before the heads compete


def pooled_horizon(scores: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    """Greedy eviction where the H heads of a layer share H x (budget - window) old-key slots -> horizon [B, H, T].

    Interleave the heads by position (entry t * H + h): at entry t * H (the first of step t) the closed form's window
    is the W previous steps of every head and its old keys are the steps before them, which is what step t's
    queries see (running top-k of a growing set: the order entries arrive in within a step does not matter).
    """
    batch, heads, length = scores.shape
    flat = scores.permute(0, 2, 1).reshape(batch, 1, length * heads)
    h = eviction_horizon(flat, heads * (budget - window), heads * window)  # last entry index that sees each key
    steps = torch.div(h, heads, rounding_mode="floor")  # the last step whose first entry still sees the key
    return steps.view(batch, length, heads).permute(0, 2, 1).contiguous()


@dataclass(frozen=True)
class PooledPolicy(EvictionPolicy):
    units: Any = None  # [layers, kv heads]: each head's scores are divided by this before the heads compete

    def adjust_scores(self, scores: torch.Tensor, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor) -> torch.Tensor:
        scores = scores / self.units[layer_idx].to(scores.device)[None, :, None]
        if CENTRED:  # minus the head's running mean score (causal, so still static per key); sinks stay +inf
            finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores)).double()
            count = torch.isfinite(scores).double().cumsum(-1).clamp_min(1)
            scores = (scores.double() - finite.cumsum(-1) / count).float()
        return scores

    def horizon(self, scores: torch.Tensor) -> torch.Tensor:
        return pooled_horizon(scores, self.budget, self.window)


def pooled(policy: LayerwisePolicy, units: torch.Tensor) -> LayerwisePolicy:
    return with_policy_class(policy, PooledPolicy, units=units)


if __name__ == "__main__":
    patch_eviction_hook()
    filters = QFilters.from_pretrained(sys.argv[1])
    book = shipped_book()
    spread = torch.tensor(book.score_spread["qfilters"], dtype=torch.float32)
    lm = load_model("smollm2")
    policies: dict = {}
    for budget in BUDGETS:
        shipped = shipped_variant(book, budget, lm, filters)
        policies["streamingllm", budget] = streamingllm(budget)
        policies["shipped", budget] = shipped
        policies["shipped, heads pooled", budget] = pooled(shipped, spread)
    out: dict = {"filters": sys.argv[1], "budgets": list(BUDGETS)}
    texts = {"search text": search_text(lm), "austen": held_out(lm, "austen")}
    if not CENTRED:
        texts["python-docs"] = held_out(lm, "python-docs")
    measure(lm, texts, policies, out)
    (HERE / ("head-pool-centred.json" if CENTRED else "head-pool.json")).write_text(json.dumps(out, indent=1) + "\n")
