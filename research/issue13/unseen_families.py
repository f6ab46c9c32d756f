"""The shipped recipes (validator-smollm2/by-layer/filters-qfilters.json) on more text families the search never saw, measured
as the validator measures held-out text: 6 documents x 2048 tokens, last 1024 scored, gap ratio against StreamingLLM
(4 sinks, window min(64, budget / 2)), budgets 64..512.
Usage: .venv/bin/python research/issue13/unseen_families.py artifacts/smollm2-handbook-en python-code,fortunes:en
[OUT.json, default unseen-families.json]
"""

from __future__ import annotations

import json
import sys

from heldout import HERE, SEQ_LEN, held_out, measure, shipped_book, streamingllm

from qfilters import QFilters, load_model
from qfilters.policy_table import ScorerInputs

BUDGETS = (64, 128, 256, 512)

if __name__ == "__main__":
    filters = QFilters.from_pretrained(sys.argv[1])
    specs = sys.argv[2].split(",")
    lm = load_model("smollm2")
    book = shipped_book()
    policies: dict = {}
    for b in BUDGETS:
        policies["streamingllm", b] = streamingllm(b)
        policies["recipe", b] = book.policy(b, lm.model, ScorerInputs(filters=filters), SEQ_LEN)
    out: dict = {"filters": sys.argv[1], "budgets": list(BUDGETS), "recipe": book.to_dict()["by_budget"]}
    measure(lm, {spec: held_out(lm, spec) for spec in specs}, policies, out)
    (HERE / (sys.argv[3] if len(sys.argv) > 3 else "unseen-families.json")).write_text(json.dumps(out, indent=1) + "\n")
