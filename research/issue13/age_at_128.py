"""At 128 the search shipped an age discount of w = 0.125 and austen's gap ratio is 0.526 (issue 13 wants <= 0.50).
Would another w get there, and would the search text pick it? The shipped recipe at 128 with only ``recency_weight``
changed, on the search text (first handbook:en + handbook:fr document) and held-out austen (6 x 2048, last 1024
scored). A diagnostic, not a search.
Usage: .venv/bin/python research/issue13/age_at_128.py artifacts/smollm2-handbook-en -> age-at-128.json
"""

from __future__ import annotations

import json
import sys

from heldout import HERE, held_out, measure, search_text, shipped_book, shipped_variant, streamingllm

from qfilters import QFilters, load_model

BUDGET = 128
WEIGHTS = (0.125, 0.1875, 0.25, 0.375)

filters = QFilters.from_pretrained(sys.argv[1])
book = shipped_book()
lm = load_model("smollm2")
policies = {("streamingllm", BUDGET): streamingllm(BUDGET)}
for w in WEIGHTS:
    policies[f"shipped age={w:g}", BUDGET] = shipped_variant(book, BUDGET, lm, filters, recency_weight=w)
out: dict = {"filters": sys.argv[1], "budget": BUDGET}
measure(lm, {"search text": search_text(lm), "austen": held_out(lm, "austen")}, policies, out)
(HERE / "age-at-128.json").write_text(json.dumps(out, indent=1) + "\n")
