"""The validator's recipe search alone, at research/issue13/validator-smollm2/run.sh's settings (handbook:en +
handbook:fr calibration text, quickstart filters, budgets 64..512, 48-needle retrieval gate), then held-out perplexity
(6 x 2048 tokens, last 1024 scored) of the chosen recipes on austen and python-docs at the budgets where the choice
differs from the recipes in research/issue13/validator-smollm2 (the others were measured there).

Measures what the search's repeated passes change (apply research/issue13/second-pass.patch first; not yet run).
Pass the full budget list: the search measures layer sensitivity at its smallest budget, so a subset of budgets gets
other sensitivity weights than the validator did. Writes research/issue13/search-converged.json.
Usage: .venv/bin/python research/issue13/search_converged.py artifacts/smollm2-handbook-en [BUDGET ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qfilters import QFilters, load_corpus, load_model
from qfilters.data.chunks import select_chunks
from qfilters.evaluate import evaluate_chunks
from qfilters.policy import EvictionPolicy
from qfilters.recipes import RecipeBook
from qfilters.scorers import StreamingLLMScorer
from qfilters.validation.recipe_search import recipe_policies, search_recipes
from qfilters.validation.settings import ValidationSettings

BUDGETS = [int(b) for b in sys.argv[2:]] or [64, 128, 256, 512]
settings = ValidationSettings(eval_seq_len=2048, score_last=1024, budgets=tuple(BUDGETS), reference_budget=128,
                              search_recipe=True, recipe_docs=1, passkey_trials=48, max_docs=6)
filters = QFilters.from_pretrained(sys.argv[1])
lm = load_model("smollm2")
before = RecipeBook.from_dict(json.loads(Path("research/issue13/validator-smollm2/filters-qfilters.json").read_text())
                              ["recipe"])
t0 = time.time()
search = search_recipes(lm, [load_corpus("handbook:en"), load_corpus("handbook:fr")], filters, BUDGETS, settings,
                        lambda p: print(f"[{time.time() - t0:7.1f}s] {p.label} {p.completed}/{p.total} {p.detail}",
                                        flush=True))
out = {"search_seconds": round(time.time() - t0, 1), "book": search.book.to_dict(), "trace": search.trace,
       "gate": None if search.retrieval is None else {"streamingllm": search.retrieval.streamingllm,
                                                      "candidates": search.retrieval.candidates},
       "changed": [b for b in BUDGETS if search.book.by_budget[b] != before.by_budget[b]], "heldout": []}
print("chosen:", {b: r.label for b, r in search.book.by_budget.items()}, "changed:", out["changed"], flush=True)
if out["changed"]:
    for spec in ("austen", "python-docs"):
        chunks = select_chunks(lm.tokenizer, load_corpus(spec), 2048, 6)
        policies = recipe_policies(search.book, filters, lm.model, out["changed"], 2048)
        for b in out["changed"]:
            policies["streamingllm", b] = EvictionPolicy(StreamingLLMScorer(4), b, min(64, b // 2), 4)
        res = evaluate_chunks(lm.model, chunks, policies, score_last=1024)
        for b in out["changed"]:
            ratio = (res.perplexity("recipe", b) - res.full_perplexity) / (
                res.perplexity("streamingllm", b) - res.full_perplexity)
            out["heldout"].append({"dataset": spec, "budget": b, "recipe": search.book.by_budget[b].label,
                                   "gap_ratio_vs_streamingllm": round(ratio, 4)})
            print(spec, b, round(ratio, 3), flush=True)
out["total_seconds"] = round(time.time() - t0, 1)
Path("research/issue13/search-converged.json").write_text(json.dumps(out, indent=1))
