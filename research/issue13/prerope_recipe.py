"""The shipped recipes with novelty measured before RoPE (see prerope_novelty.py), perplexity side: the blend's
novelty spread re-measured on the first search document, as the validator would, then the one-pass evaluator on the
search text and held-out austen and python-docs, against the shipped recipes and StreamingLLM. First written with a
patched NoveltyScorer; now the library's content novelty (Recipe.novelty_scorer = "content-novelty").
Usage: .venv/bin/python research/issue13/prerope_recipe.py artifacts/smollm2-handbook-en [budgets] [texts]
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from heldout import HERE, SEQ_LEN, held_out, measure, search_text, shipped_book, streamingllm

from qfilters import QFilters, load_model
from qfilters.policy_table import ScorerInputs
from qfilters.recipes import score_spread
from qfilters.rope import rope_frequencies
from qfilters.scorers import ContentNoveltyScorer

if __name__ == "__main__":
    filters = QFilters.from_pretrained(sys.argv[1])
    budgets = tuple(int(b) for b in sys.argv[2].split(",")) if len(sys.argv) > 2 else (64, 128, 256, 512)
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else ["search text", "austen", "python-docs"]
    lm = load_model("smollm2")
    book = shipped_book()
    search = search_text(lm)
    content = ContentNoveltyScorer(n_sinks=0, frequencies=rope_frequencies(lm.model))
    spread = score_spread(lm.model, search.ids[0], {"content-novelty": content})
    pre_book = replace(book, by_budget={b: replace(r, novelty_scorer="content-novelty")
                                        for b, r in book.by_budget.items()},
                       score_spread={**book.score_spread, **spread})
    inputs = ScorerInputs(filters=filters)
    policies: dict = {}
    for b in budgets:
        policies["streamingllm", b] = streamingllm(b)
        policies["shipped", b] = book.policy(b, lm.model, inputs, SEQ_LEN)
        policies["shipped, pre-RoPE novelty", b] = pre_book.policy(b, lm.model, inputs, SEQ_LEN)
    out: dict = {"filters": sys.argv[1], "budgets": list(budgets), "novelty_spread_prerope": spread["content-novelty"],
                 "novelty_spread_shipped": book.score_spread["novelty"]}
    loaders = {"search text": lambda: search, "austen": lambda: held_out(lm, "austen"),
               "python-docs": lambda: held_out(lm, "python-docs")}
    measure(lm, {n: loaders[n]() for n in names}, policies, out)
    (HERE / "prerope-recipe.json").write_text(json.dumps(out, indent=1) + "\n")
