"""Would a soft recency term help where the converged search still misses issue 13's targets? A diagnostic.

score = recipe score + spread(Q-Filters)[layer, head] * position / (H * layer budget): a key must beat a newer key by
one spread of the Q-Filter score for every H budgets of age. Static per key (position and key only), so the one-pass
evaluator stays exact. H = inf is the shipped recipe; a hard window is kept as well.
Measured on the book shipped at commit 175c980 (before the age axis); the file now holds a later one. The
library's AgedScorer (added after this) is the same discount, summed in float64.
Usage: .venv/bin/python research/issue13/soft_recency.py artifacts/smollm2-handbook-en
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from heldout import HERE, held_out, measure, search_text, shipped_book, shipped_variant, streamingllm

from qfilters import QFilters, load_model
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.scorers import AgedScorer

parser = argparse.ArgumentParser()
parser.add_argument("filters")
parser.add_argument("--docs", type=int, default=6)
parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128])
parser.add_argument("--horizons", type=float, nargs="+", default=[math.inf, 4.0, 2.0, 1.0])
parser.add_argument("--narrow-horizons", type=float, nargs="*", default=[2.0, 1.0], help="with window share 0.25")
parser.add_argument("--texts", nargs="+", default=["search text", "austen", "python-docs"])
parser.add_argument("--out", default="soft-recency.json")
args = parser.parse_args()
VARIANTS = [(None, h) for h in args.horizons] + [(0.25, h) for h in args.narrow_horizons]
filters = QFilters.from_pretrained(args.filters)
book = shipped_book()
spread = torch.tensor(book.score_spread["qfilters"], dtype=torch.float32)  # [L, H]
lm = load_model("smollm2")

policies = {}
for budget in args.budgets:
    policies["streamingllm", budget] = streamingllm(budget)
    for share, h in VARIANTS:
        change = {} if share is None else {"window_share": share}
        base = shipped_variant(book, budget, lm, filters, **change)
        share = book.recipe_for(budget).window_share if share is None else share
        if math.isfinite(h):
            base = LayerwisePolicy({i: None if p is None else EvictionPolicy(
                AgedScorer(p.scorer, spread / (h * p.budget)), p.budget, p.window, p.n_sinks)
                for i, p in base.layers.items()})
        policies[f"w={share:g} H={h:g}", budget] = base

texts = {"search text": search_text(lm)} if "search text" in args.texts else {}
texts |= {s: held_out(lm, s, args.docs) for s in args.texts if s != "search text"}
out: dict = {"filters": args.filters}
measure(lm, texts, policies, out)
(HERE / args.out).write_text(json.dumps(out, indent=1) + "\n")
