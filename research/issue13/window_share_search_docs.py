"""Would more search text choose the window shares that held-out text prefers? Search-text perplexity (the first 2
documents of handbook:en and of handbook:fr, i.e. `--recipe-docs 2`; 2048 tokens, last 1024 scored) of the shipped
recipes of research/issue13/validator-smollm2 with the window share 50 / 62.5 / 75%. Companion of
window_share_wider.py (which used 1 document per corpus, as the validator does). Writes
research/issue13/window-share-search-docs.json.
Usage: .venv/bin/python research/issue13/window_share_search_docs.py artifacts/smollm2-handbook-en
"""

from __future__ import annotations

import json
import sys
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
filters = QFilters.from_pretrained(sys.argv[1])
book = RecipeBook.from_dict(json.loads((HERE / "validator-smollm2/filters-qfilters.json").read_text())["recipe"])
lm = load_model("smollm2")
chunks = EvalChunks(2048)
for spec in ("handbook:en", "handbook:fr"):
    part = select_chunks(lm.tokenizer, load_corpus(spec), 2048, 2)
    chunks.ids += part.ids
    chunks.titles += [f"{spec}: {t}" for t in part.titles]
policies = {}
for budget in (64, 128, 256):
    policies["streamingllm", budget] = EvictionPolicy(StreamingLLMScorer(4), budget, min(64, budget // 2), 4)
    for share in (0.5, 0.625, 0.75):
        one = RecipeBook({budget: replace(book.recipe_for(budget), window_share=share)}, book.sensitivity, 2048,
                         score_spread=book.score_spread)
        policies[f"shipped window={share:g}", budget] = one.policy(budget, lm.model, ScorerInputs(filters=filters), 2048)
res = evaluate_chunks(lm.model, chunks, policies, score_last=1024)
rows = [{"policy": p, "budget": b, "perplexity": round(res.perplexity(p, b), 4)} for p, b in policies]
for row in rows:
    print(row, flush=True)
out = {"documents": chunks.titles, "full": round(res.full_perplexity, 4), "rows": rows}
(HERE / "window-share-search-docs.json").write_text(json.dumps(out, indent=1) + "\n")
