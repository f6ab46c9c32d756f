"""Heads differ in how local their attention is, but the recipe's age discount is one weight per budget for every
head. Per KV head, pick a multiplier of the shipped rate that keeps the most full-cache attention mass on the search
text (calibration text, real attention: a calibration-time measurement, the scorer stays FlashAttention-compatible),
then measure perplexity with those per-head rates on the search text and held-out austen and python-docs.
A diagnostic, not a search.
Usage: .venv/bin/python research/issue13/head_age.py artifacts/smollm2-handbook-en -> head-age.json
(The committed head-age.json holds the rows of a run stopped before python-docs, copied from its log.)
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import torch
from heldout import HERE, held_out, measure, search_text, shipped_book, shipped_variant, streamingllm

from qfilters import QFilters, load_model
from qfilters.attention import attention_hook
from qfilters.eviction import eviction_horizon, prepare_scores
from qfilters.policy import LayerwisePolicy
from qfilters.scorers import AgedScorer

BUDGETS = (64, 128)
MULTIPLIERS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def retained_mass(policy: LayerwisePolicy, lm, chunks) -> dict[int, torch.Tensor]:
    """layer -> [multipliers, kv heads] full-cache attention mass each multiplier's eviction keeps (summed)."""
    out: dict[int, torch.Tensor] = {}

    def hook(module, query, key, value, attention_mask, base_fn, **kwargs):
        layer = policy.for_layer(module.layer_idx)
        if layer is not None:
            length, kv = key.shape[2], key.shape[1]
            rep = query.shape[1] // kv
            logits = (query.float() @ key.float().repeat_interleave(rep, 1).transpose(-1, -2)) * module.scaling
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)  # [B, Hq, T, T]
            probs = probs.view(probs.shape[0], kv, rep, length, length).sum(2)  # [B, Hkv, T(query), T(key)]
            scorer = layer.scorer
            pos = torch.arange(length)
            inner = scorer.inner.score(key, module.layer_idx, pos).double()
            rate = scorer.rates[module.layer_idx].double()[None, :, None]
            t = pos[:, None]
            rows = []
            for m in MULTIPLIERS:
                s = prepare_scores((inner + m * rate * pos.double()).float(), pos, layer.n_sinks)
                horizon = eviction_horizon(s, layer.budget - layer.window, layer.window)  # [B, Hkv, T]
                vis = (pos[None, :] <= t) & (t <= horizon[..., None, :])  # [B, Hkv, T, T]
                rows.append((probs * vis).sum(dim=(0, 2, 3)))
            out[module.layer_idx] = out.get(module.layer_idx, 0) + torch.stack(rows)
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    with torch.inference_mode(), attention_hook(lm.model, hook):
        for ids in chunks.ids:
            lm.model(ids, use_cache=False)
    return out


def per_head(policy: LayerwisePolicy, mass: dict[int, torch.Tensor]) -> tuple[LayerwisePolicy, list]:
    layers, chosen = {}, []
    for i, layer in policy.layers.items():
        if layer is None:
            layers[i] = None
            continue
        best = torch.tensor(MULTIPLIERS, dtype=torch.float32)[mass[i].argmax(0)]  # [kv heads]
        chosen.append(best.tolist())
        rates = layer.scorer.rates.clone()
        rates[i] = rates[i] * best
        layers[i] = replace(layer, scorer=AgedScorer(layer.scorer.inner, rates))
    return LayerwisePolicy(layers), chosen


filters = QFilters.from_pretrained(sys.argv[1])
book = shipped_book()
lm = load_model("smollm2")
search = search_text(lm)
policies: dict = {}
out: dict = {"filters": sys.argv[1], "budgets": list(BUDGETS), "multipliers": list(MULTIPLIERS), "chosen": {}}
for budget in BUDGETS:
    shipped = shipped_variant(book, budget, lm, filters)
    fitted, chosen = per_head(shipped, retained_mass(shipped, lm, search))
    out["chosen"][budget] = chosen
    print(budget, chosen, flush=True)
    policies["streamingllm", budget] = streamingllm(budget)
    policies["shipped", budget] = shipped
    policies["per-head age", budget] = fitted
texts = {"search text": search, "austen": held_out(lm, "austen"), "python-docs": held_out(lm, "python-docs")}
measure(lm, texts, policies, out)
(HERE / "head-age.json").write_text(json.dumps(out, indent=1) + "\n")
