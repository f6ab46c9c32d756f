"""Would a wider recent window (62.5% / 75% of each layer's budget, beyond the search's 12.5/25/50%) help where the
converged search still misses issue 13's targets (austen at 128 needs <= 0.50x StreamingLLM's gap, python-docs at 64
needs <= 1.0x)? The shipped recipes of research/issue13/validator-smollm2 with only the window share changed. A
diagnostic, not a search.

Default: on the search text (the first handbook:en + handbook:fr document, as the validator searches) and held out
(austen, python-docs: 6 x 2048, last 1024 scored) -> research/issue13/window-share-wider.json.
``--search-docs 2``: the search text only, with the first 2 documents of each (as ``--recipe-docs 2`` would search),
to see whether more search text changes the choice -> research/issue13/window-share-search-docs.json.
Measured on the book shipped at commit 175c980 (before the age axis); the file now holds a later one.
Usage: .venv/bin/python research/issue13/window_share_wider.py artifacts/smollm2-handbook-en [--search-docs N]
"""

from __future__ import annotations

import argparse
import json

from heldout import HERE, held_out, measure, search_text, shipped_book, shipped_variant, streamingllm

from qfilters import QFilters, load_model

BUDGETS = (64, 128, 256)
SHARES = (0.5, 0.625, 0.75)

parser = argparse.ArgumentParser()
parser.add_argument("filters")
parser.add_argument("--search-docs", type=int, default=1)
args = parser.parse_args()
filters = QFilters.from_pretrained(args.filters)
book = shipped_book()
lm = load_model("smollm2")

policies = {}
for budget in BUDGETS:
    policies["streamingllm", budget] = streamingllm(budget)
    for share in SHARES:
        policies[f"shipped window={share:g}", budget] = shipped_variant(book, budget, lm, filters, window_share=share)

texts = {"search text": search_text(lm, args.search_docs)}
if args.search_docs == 1:
    texts |= {s: held_out(lm, s) for s in ("austen", "python-docs")}
out: dict = {"filters": args.filters, "search_documents": texts["search text"].titles}
measure(lm, texts, policies, out)
target = "window-share-wider.json" if args.search_docs == 1 else "window-share-search-docs.json"
(HERE / target).write_text(json.dumps(out, indent=1) + "\n")
