"""Do the two knobs held-out text liked at 128 (age w = 0.25, value weight 0.5; see age-at-128.json and
value-norm.json) add up, and would a larger search text (2 documents per language, --recipe-docs 2) choose them?
The shipped recipe at 128 with those fields changed, on that search text and held-out austen and python-docs.
A diagnostic with heldout.py's patched one-pass hook and value_norm.py's value term, not a search.
Usage: .venv/bin/python research/issue13/value_age.py artifacts/smollm2-handbook-en -> value-age.json
"""

from __future__ import annotations

import json
import sys

import torch
from heldout import (
                     HERE,
                     held_out,
                     measure,
                     patch_eviction_hook,
                     search_text,
                     shipped_book,
                     shipped_variant,
                     streamingllm,
)
from value_norm import valued

from qfilters import QFilters, load_model

BUDGET = 128
patch_eviction_hook()
filters = QFilters.from_pretrained(sys.argv[1])
book = shipped_book()
spread = torch.tensor(book.score_spread["qfilters"], dtype=torch.float32)
lm = load_model("smollm2")
aged = shipped_variant(book, BUDGET, lm, filters, recency_weight=0.25)
policies = {("streamingllm", BUDGET): streamingllm(BUDGET),
            ("shipped", BUDGET): shipped_variant(book, BUDGET, lm, filters),
            ("age=0.25", BUDGET): aged,
            ("value=0.5", BUDGET): valued(shipped_variant(book, BUDGET, lm, filters), 0.5 * spread),
            ("age=0.25 value=0.5", BUDGET): valued(aged, 0.5 * spread)}
out: dict = {"filters": sys.argv[1], "budget": BUDGET}
texts = {"search text x2": search_text(lm, docs=2), "austen": held_out(lm, "austen"),
         "python-docs": held_out(lm, "python-docs")}
measure(lm, texts, policies, out)
(HERE / "value-age.json").write_text(json.dumps(out, indent=1) + "\n")
