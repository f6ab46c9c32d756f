"""Would a wider recent window (62.5% / 75% of each layer's budget, beyond the search's 12.5/25/50%) help where the
converged search still misses issue 13's targets (austen at 128 needs <= 0.50x StreamingLLM's gap, python-docs at 64
needs <= 1.0x)? The shipped recipes of research/issue13/validator-smollm2 with only the window share changed. A
diagnostic, not a search.

Default: on the search text (the first handbook:en + handbook:fr document, as the validator searches) and held out
(austen, python-docs: 6 x 2048, last 1024 scored) -> research/issue13/window-share-wider.json.
``--search-docs 2``: the search text only, with the first 2 documents of each (as ``--recipe-docs 2`` would search),
to see whether more search text changes the choice -> research/issue13/window-share-search-docs.json.
Usage: .venv/bin/python research/issue13/window_share_wider.py artifacts/smollm2-handbook-en [--search-docs N]
"""

from __future__ import annotations

import argparse
import json
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
BUDGETS = (64, 128, 256)
SHARES = (0.5, 0.625, 0.75)

parser = argparse.ArgumentParser()
parser.add_argument("filters")
parser.add_argument("--search-docs", type=int, default=1)
args = parser.parse_args()
filters = QFilters.from_pretrained(args.filters)
book = RecipeBook.from_dict(json.loads((HERE / "validator-smollm2/filters-qfilters.json").read_text())["recipe"])
lm = load_model("smollm2")

policies = {}
for budget in BUDGETS:
    policies["streamingllm", budget] = EvictionPolicy(StreamingLLMScorer(4), budget, min(64, budget // 2), 4)
    for share in SHARES:
        one = RecipeBook({budget: replace(book.recipe_for(budget), window_share=share)}, book.sensitivity, 2048,
                         score_spread=book.score_spread)
        policies[f"shipped window={share:g}", budget] = one.policy(budget, lm.model, ScorerInputs(filters=filters), 2048)

search_text = EvalChunks(2048)
for spec in ("handbook:en", "handbook:fr"):
    part = select_chunks(lm.tokenizer, load_corpus(spec), 2048, args.search_docs)
    search_text.ids += part.ids
    search_text.titles += [f"{spec}: {t}" for t in part.titles]
texts = {"search text": search_text}
if args.search_docs == 1:
    texts |= {s: select_chunks(lm.tokenizer, load_corpus(s), 2048, 6) for s in ("austen", "python-docs")}
out: dict = {"filters": args.filters, "search_documents": search_text.titles, "rows": [], "seconds": {}}
for name, chunks in texts.items():
    t0 = time.time()
    res = evaluate_chunks(lm.model, chunks, policies, score_last=1024)
    full = res.full_perplexity
    for policy, budget in policies:
        ratio = (res.perplexity(policy, budget) - full) / (res.perplexity("streamingllm", budget) - full)
        out["rows"].append({"text": name, "policy": policy, "budget": budget,
                            "perplexity": round(res.perplexity(policy, budget), 4), "full": round(full, 4),
                            "gap_ratio_vs_streamingllm": round(ratio, 4)})
        print(f"{name:12s} {budget:4d} {policy:24s} ppl {res.perplexity(policy, budget):8.3f} ratio {ratio:.3f}",
              flush=True)
    out["seconds"][name] = round(time.time() - t0, 1)
target = "window-share-wider.json" if args.search_docs == 1 else "window-share-search-docs.json"
(HERE / target).write_text(json.dumps(out, indent=1) + "\n")
