"""Diagnostic, not a search: held-out gap ratio vs StreamingLLM of the validator's shipped recipe at 128 and 256 with
novelty blended in (weights 0.5 / 1.0, the search's own score spreads), on held-out Austen and python-docs.

The search (handbook calibration text) did not pick these; this measures what it left on the table. Writes
research/issue13/blend-heldout.json. Usage: .venv/bin/python research/issue13/blend_heldout.py reports/issue13-recipe/filters
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from qfilters import QFilters, load_corpus, load_model
from qfilters.data.chunks import select_chunks
from qfilters.evaluate import evaluate_chunks
from qfilters.policy import EvictionPolicy
from qfilters.policy_table import ScorerInputs
from qfilters.recipes import RecipeBook
from qfilters.scorers import StreamingLLMScorer

torch.manual_seed(0)
filters = QFilters.from_pretrained(sys.argv[1])
book = filters.recipe
lm = load_model("smollm2")
out: dict = {"filters": sys.argv[1], "rows": []}
for spec in ("austen", "python-docs"):
    chunks = select_chunks(lm.tokenizer, load_corpus(spec), 2048, 6)
    policies = {}
    for budget in (128, 256):
        policies["streamingllm", budget] = EvictionPolicy(StreamingLLMScorer(4), budget, min(64, budget // 2), 4)
        base = book.recipe_for(budget)
        for w in (0.0, 0.5, 1.0):
            one = RecipeBook({budget: replace(base, novelty_weight=w)}, book.sensitivity, book.context_length,
                             score_spread=book.score_spread)
            policies[f"recipe+blend{w:g}", budget] = one.policy(budget, lm.model, ScorerInputs(filters=filters), 2048)
    t0 = time.time()
    res = evaluate_chunks(lm.model, chunks, policies, score_last=1024, progress=True)
    full = res.full_perplexity
    for (name, budget) in policies:
        gap = res.perplexity(name, budget) - full
        sllm = res.perplexity("streamingllm", budget) - full
        out["rows"].append({"dataset": spec, "policy": name, "budget": budget, "perplexity": res.perplexity(name, budget),
                            "full": full, "gap_ratio_vs_streamingllm": gap / sllm})
        print(spec, name, budget, round(gap / sllm, 3), flush=True)
    out.setdefault("seconds", {})[spec] = round(time.time() - t0, 1)
Path("research/issue13/blend-heldout.json").write_text(json.dumps(out, indent=1))
