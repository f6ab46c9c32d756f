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
from heldout import HERE, held_out, measure, search_text, shipped_book, shipped_variant, streamingllm

from qfilters import QFilters, load_model, onepass
from qfilters.architecture import COMPRESS, layer_kinds
from qfilters.eviction import eviction_horizon
from qfilters.policy import EvictionPolicy, LayerwisePolicy

BUDGETS = (64, 128)
WEIGHTS = (0.0, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class ValuePolicy(EvictionPolicy):
    value_weights: Any = None  # [layers, kv heads] score units per unit of log ||v||


def valued(policy: LayerwisePolicy, weights: torch.Tensor) -> LayerwisePolicy:
    return LayerwisePolicy({i: None if p is None else ValuePolicy(p.scorer, p.budget, p.window, p.n_sinks,
                                                                   value_weights=weights)
                            for i, p in policy.layers.items()})


def hook_with_values(model: Any, policy: Any) -> Any:
    kinds = layer_kinds(model)

    def hook(module, query, key, value, attention_mask, base_fn, **kwargs):
        layer = policy.for_layer(module.layer_idx) if kinds[module.layer_idx] == COMPRESS else None
        if layer is None:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        positions = torch.arange(query.shape[2], device=key.device)
        scores = layer.scores(key, module.layer_idx, positions)
        weights = getattr(layer, "value_weights", None)
        if weights is not None:
            row = weights[module.layer_idx].to(scores.device)[None, :, None]
            scores = scores + row * value.float().norm(dim=-1).clamp_min(1e-6).log()
        horizon = eviction_horizon(scores, layer.budget - layer.window, layer.window)
        kwargs.pop("is_causal", None)
        return onepass.evicted_attention(module, query, key, value, attention_mask, horizon, base_fn,
                                         onepass._block_size(layer.budget), **kwargs)

    return hook


if __name__ == "__main__":
    onepass.eviction_hook = hook_with_values
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
