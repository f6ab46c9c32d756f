"""Would a key's value norm help? The attention output is sum_j a_j v_j, so evicting a key whose value is small
costs less than evicting one of the same score with a large value (VATP-style value-aware eviction). The shipped
recipes at 64 and 128 with ``w x spread(qfilters)[l, h] x log ||v_j||`` added to each key's score, on the search text
and held-out austen and python-docs (6 x 2048, last 1024 scored). A diagnostic with a patched one-pass hook (the
scorer API sees keys only), not a search.
Usage: .venv/bin/python research/issue13/value_norm.py artifacts/smollm2-handbook-en -> value-norm.json
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

BUDGETS = (64, 128)
WEIGHTS = (0.0, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class ValuePolicy(EvictionPolicy):
    value_weights: Any = None  # [layers, kv heads] score units per unit of log ||v||

    def adjust_scores(self, scores: torch.Tensor, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor) -> torch.Tensor:
        row = self.value_weights[layer_idx].to(scores.device)[None, :, None]
        return scores + row * value.float().norm(dim=-1).clamp_min(1e-6).log()


def valued(policy: LayerwisePolicy, weights: torch.Tensor) -> LayerwisePolicy:
    return with_policy_class(policy, ValuePolicy, value_weights=weights)


if __name__ == "__main__":
    patch_eviction_hook()
    filters = QFilters.from_pretrained(sys.argv[1])
    book = shipped_book()
    spread = torch.tensor(book.score_spread["qfilters"], dtype=torch.float32)
    lm = load_model("smollm2")
    policies: dict = {}
    for budget in BUDGETS:
        policies["streamingllm", budget] = streamingllm(budget)
        shipped = shipped_variant(book, budget, lm, filters)
        for w in WEIGHTS:
            policies[f"shipped value={w:g}", budget] = valued(shipped, w * spread) if w else shipped
    out: dict = {"filters": sys.argv[1], "budgets": list(BUDGETS)}
    texts = {"search text": search_text(lm), "austen": held_out(lm, "austen"), "python-docs": held_out(lm, "python-docs")}
    measure(lm, texts, policies, out)
    (HERE / "value-norm.json").write_text(json.dumps(out, indent=1) + "\n")
