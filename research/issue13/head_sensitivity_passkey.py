"""Does the per-head sensitivity split (head_sensitivity.py) keep issue 13's retrieval result? Passkeys as the
validator runs them (48 seeded needles in 1024-token Austen contexts, kvpress protocol, teacher-forced argmax) at
128 / 256 / 512 for StreamingLLM, the shipped recipe and the same recipe with its memory split per KV head (half
uniform, half by measured sensitivity, head-sensitivity.json). qfilters.passkey keeps one budget per layer, so its
context-end selection is patched here to read each head's own budget and window.
Usage: .venv/bin/python research/issue13/head_sensitivity_passkey.py artifacts/smollm2-handbook-en
"""

from __future__ import annotations

import json
import sys
import time

import torch
from head_budgets import PerHeadPolicy
from head_sensitivity import by_sensitivity
from heldout import HERE, shipped_book, shipped_variant, streamingllm

from qfilters import QFilters, load_corpus, load_model, passkey

_stock_keep = passkey._keep_static


def _keep_per_head(policy, keys, layer):
    """bool [B, H, T]: per head, its window plus its best (budget - window) older keys by the layer's scores."""
    if not isinstance(policy, PerHeadPolicy):
        return _stock_keep(policy, keys, layer)
    length = keys.shape[2]
    scores = policy.scores(keys, layer, torch.arange(length, device=keys.device))  # [B, H, T], every head at once
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=keys.device)
    for h, (budget, window) in enumerate(zip(policy.head_budgets, policy.windows, strict=True)):
        if length <= budget:
            keep[:, h] = True
            continue
        n_old = length - window
        order = torch.sort(scores[:, h, :n_old], dim=-1, descending=True, stable=True).indices
        keep[:, h].scatter_(-1, order[:, : budget - window], True)
        keep[:, h, n_old:] = True
    return keep


if __name__ == "__main__":
    passkey._keep_static = _keep_per_head
    filters = QFilters.from_pretrained(sys.argv[1])
    book = shipped_book()
    lm = load_model("smollm2")
    stored = json.loads((HERE / "head-sensitivity.json").read_text())["head_sensitivity"]
    sens = {tuple(int(x) for x in k.split(".")): v for k, v in stored.items()}
    policies = {}
    for budget in (128, 256, 512):
        shipped = shipped_variant(book, budget, lm, filters, context_length=1024)
        policies[f"streamingllm {budget}"] = streamingllm(budget)
        policies[f"recipe {budget}"] = shipped
        share = book.recipe_for(budget).window_share
        policies[f"head sensitivity {budget}"] = by_sensitivity(shipped, sens, 0.5, share)[0]
    filler = "\n".join(d.text for d in load_corpus("austen").documents)
    trials = passkey.make_trials(lm.tokenizer, filler, 48, 1024, 0)
    t0 = time.time()
    run = passkey.run_passkey(lm.model, trials, {"full": None, **policies})
    out = {"trials": len(trials), "context_tokens": 1024, "seconds": round(time.time() - t0),
           "hits": {label: sum(h) for label, h in run.hits.items()}}
    print(json.dumps(out["hits"], indent=1))
    (HERE / "head-sensitivity-passkey.json").write_text(json.dumps(out, indent=1) + "\n")
