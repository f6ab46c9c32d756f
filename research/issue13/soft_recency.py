"""Would a soft recency term help where the converged search still misses issue 13's targets? A diagnostic.

score = recipe score + spread(Q-Filters)[layer, head] * position / (H * layer budget): a key must beat a newer key by
one spread of the Q-Filter score for every H budgets of age. Static per key (position and key only), so the one-pass
evaluator stays exact. H = inf is the shipped recipe; a hard window is kept as well.
Usage: .venv/bin/python research/issue13/soft_recency.py artifacts/smollm2-handbook-en
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from qfilters import QFilters, load_corpus, load_model
from qfilters.data.chunks import EvalChunks, select_chunks
from qfilters.evaluate import evaluate_chunks
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.policy_table import ScorerInputs
from qfilters.recipes import RecipeBook
from qfilters.scorers import Scorer, StreamingLLMScorer

HERE = Path(__file__).parent


@dataclass
class Aged(Scorer):
    inner: Scorer
    rate: torch.Tensor  # [L, H] score units per position
    name = "aged"

    def score(self, keys, layer_idx, positions):
        return self.score_stream(keys, layer_idx, positions, None)[0]

    def score_stream(self, keys, layer_idx, positions, state):
        s, state = self.inner.score_stream(keys, layer_idx, positions, state)
        r = self.rate[layer_idx][None, :, None].to(s.device)
        return s + r * positions.to(s.device).float()[None, None], state


parser = argparse.ArgumentParser()
parser.add_argument("filters")
parser.add_argument("--docs", type=int, default=6)
parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128])
parser.add_argument("--horizons", type=float, nargs="+", default=[math.inf, 4.0, 2.0, 1.0])
parser.add_argument("--narrow-horizons", type=float, nargs="*", default=[2.0, 1.0], help="with window share 0.25")
parser.add_argument("--texts", nargs="+", default=["search text", "austen", "python-docs"])
parser.add_argument("--out", default="soft-recency.json")
args = parser.parse_args()
BUDGETS = args.budgets
VARIANTS = [(None, h) for h in args.horizons] + [(0.25, h) for h in args.narrow_horizons]
filters = QFilters.from_pretrained(args.filters)
book = RecipeBook.from_dict(json.loads((HERE / "validator-smollm2/filters-qfilters.json").read_text())["recipe"])
spread = torch.tensor(book.score_spread["qfilters"], dtype=torch.float32)  # [L, H]
lm = load_model("smollm2")

policies = {}
for budget in BUDGETS:
    policies["streamingllm", budget] = EvictionPolicy(StreamingLLMScorer(4), budget, min(64, budget // 2), 4)
    for share, h in VARIANTS:
        recipe = book.recipe_for(budget)
        if share is not None:
            recipe = replace(recipe, window_share=share)
        one = RecipeBook({budget: recipe}, book.sensitivity, 2048, score_spread=book.score_spread)
        base = one.policy(budget, lm.model, ScorerInputs(filters=filters), 2048)
        name = f"w={recipe.window_share:g} H={h:g}"
        if math.isfinite(h):
            layers = {i: None if p is None else EvictionPolicy(Aged(p.scorer, spread / (h * p.budget)), p.budget,
                                                                p.window, p.n_sinks)
                      for i, p in base.layers.items()}
            base = LayerwisePolicy(layers)
        policies[name, budget] = base

search_text = EvalChunks(2048)
for spec in ("handbook:en", "handbook:fr"):
    part = select_chunks(lm.tokenizer, load_corpus(spec), 2048, 1)
    search_text.ids += part.ids
    search_text.titles += [f"{spec}: {t}" for t in part.titles]
texts = {"search text": search_text} if "search text" in args.texts else {}
texts |= {s: select_chunks(lm.tokenizer, load_corpus(s), 2048, args.docs) for s in args.texts if s != "search text"}
out: dict = {"filters": args.filters, "rows": [], "seconds": {}}
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
(HERE / args.out).write_text(json.dumps(out, indent=1) + "\n")
