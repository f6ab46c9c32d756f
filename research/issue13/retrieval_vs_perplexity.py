"""The retrieval side's best scorer on the perplexity side. Content novelty alone (4 sinks, a recent window, the rest
ranked by -cos(k_t, running sum) with RoPE undone) finds 15 / 34 / 46 of 48 Austen passkeys at 128 / 256 / 512
(window 64) and 24 / 40 / 46 (window 16), where the shipped perplexity recipes find 3 / 9 / 47. What does it cost in
perplexity? Gap ratio vs StreamingLLM on the search text and held-out Austen and python-docs, 64..512, beside the
shipped recipes. If it were within 0.50x at 128 on Austen, one recipe would meet both acceptance points there.
Usage: .venv/bin/python research/issue13/retrieval_vs_perplexity.py artifacts/smollm2-handbook-en [texts]
"""

from __future__ import annotations

import json
import sys

from heldout import HERE, SEQ_LEN, held_out, measure, search_text, shipped_book, streamingllm

from qfilters import QFilters, load_model
from qfilters.architecture import compressed_layers
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.policy_table import ScorerInputs
from qfilters.rope import rope_frequencies
from qfilters.scorers import ContentNoveltyScorer

BUDGETS = (64, 128, 256, 512)

if __name__ == "__main__":
    filters = QFilters.from_pretrained(sys.argv[1])
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["search text", "austen", "python-docs"]
    lm = load_model("smollm2")
    layers = compressed_layers(lm.model)
    book = shipped_book()
    content = ContentNoveltyScorer(frequencies=rope_frequencies(lm.model))
    policies: dict = {}
    for b in BUDGETS:
        policies["streamingllm", b] = streamingllm(b)
        policies["shipped recipe", b] = book.policy(b, lm.model, ScorerInputs(filters=filters), SEQ_LEN)
        policies["content novelty w64", b] = LayerwisePolicy.uniform(EvictionPolicy(content, b, min(64, b // 2), 4),
                                                                     layers)
        policies["content novelty w16", b] = LayerwisePolicy.uniform(EvictionPolicy(content, b, 16, 4), layers)
    out: dict = {"filters": sys.argv[1], "budgets": list(BUDGETS)}
    loaders = {"search text": lambda: search_text(lm), "austen": lambda: held_out(lm, "austen"),
               "python-docs": lambda: held_out(lm, "python-docs")}
    measure(lm, {n: loaders[n]() for n in names}, policies, out)
    (HERE / "retrieval-vs-perplexity.json").write_text(json.dumps(out, indent=1) + "\n")
