"""At 128 the search shipped an age discount of w = 0.125 and austen's gap ratio is 0.526 (issue 13 wants <= 0.50).
Would another w get there, and would the search text pick it? The shipped recipe at 128 with only ``recency_weight``
changed, on the search text (first handbook:en + handbook:fr document) and held-out austen (6 x 2048, last 1024
scored). A diagnostic, not a search.
Usage: .venv/bin/python research/issue13/age_at_128.py artifacts/smollm2-handbook-en -> age-at-128.json
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from qfilters import QFilters, load_corpus, load_model
from qfilters.data.chunks import EvalChunks, select_chunks
from qfilters.evaluate import evaluate_chunks
from qfilters.policy import EvictionPolicy
from qfilters.policy_table import ScorerInputs
from qfilters.recipes import RecipeBook
from qfilters.scorers import StreamingLLMScorer

HERE = Path(__file__).parent
BUDGET = 128
WEIGHTS = (0.125, 0.1875, 0.25, 0.375)

filters = QFilters.from_pretrained(sys.argv[1])
book = RecipeBook.from_dict(json.loads((HERE / "validator-smollm2/filters-qfilters.json").read_text())["recipe"])
lm = load_model("smollm2")
policies = {("streamingllm", BUDGET): EvictionPolicy(StreamingLLMScorer(4), BUDGET, 64, 4)}
for w in WEIGHTS:
    one = RecipeBook({BUDGET: replace(book.recipe_for(BUDGET), recency_weight=w)}, book.sensitivity, 2048,
                     score_spread=book.score_spread)
    policies[f"shipped age={w:g}", BUDGET] = one.policy(BUDGET, lm.model, ScorerInputs(filters=filters), 2048)
search_text = EvalChunks(2048)
for spec in ("handbook:en", "handbook:fr"):
    part = select_chunks(lm.tokenizer, load_corpus(spec), 2048, 1)
    search_text.ids += part.ids
    search_text.titles += [f"{spec}: {t}" for t in part.titles]
texts = {"search text": search_text, "austen": select_chunks(lm.tokenizer, load_corpus("austen"), 2048, 6)}
out: dict = {"filters": sys.argv[1], "budget": BUDGET, "rows": [], "seconds": {}}
for name, chunks in texts.items():
    t0 = time.time()
    res = evaluate_chunks(lm.model, chunks, policies, score_last=1024)
    full = res.full_perplexity
    for policy, budget in policies:
        ratio = (res.perplexity(policy, budget) - full) / (res.perplexity("streamingllm", budget) - full)
        out["rows"].append({"text": name, "policy": policy, "perplexity": round(res.perplexity(policy, budget), 4),
                            "full": round(full, 4), "gap_ratio_vs_streamingllm": round(ratio, 4)})
        print(f"{name:12s} {policy:24s} ppl {res.perplexity(policy, budget):8.3f} ratio {ratio:.3f}", flush=True)
    out["seconds"][name] = round(time.time() - t0, 1)
(HERE / "age-at-128.json").write_text(json.dumps(out, indent=1) + "\n")
