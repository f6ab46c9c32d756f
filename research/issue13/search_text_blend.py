"""Why the search did not ship the blend at 128: search-text perplexity (the first handbook:en + handbook:fr documents,
2048 tokens, last 1024 scored) of the shipped 128/256 recipes and of the search's start, each with blend weight 0 / 0.5
/ 1. Output: research/issue13/search-text-blend.txt.
Usage (after bash research/issue13/validator-smollm2/run.sh): .venv/bin/python research/issue13/search_text_blend.py"""
import json, sys
from dataclasses import replace
from qfilters import QFilters, load_corpus, load_model
from qfilters.data.chunks import EvalChunks, select_chunks
from qfilters.evaluate import evaluate_chunks
from qfilters.policy import EvictionPolicy
from qfilters.policy_table import ScorerInputs
from qfilters.recipes import Recipe, RecipeBook
from qfilters.scorers import StreamingLLMScorer
filters = QFilters.from_pretrained("reports/issue13-recipe/filters"); book = filters.recipe
lm = load_model("smollm2")
chunks = EvalChunks(2048)
for spec in ("handbook:en", "handbook:fr"):
    part = select_chunks(lm.tokenizer, load_corpus(spec), 2048, 1); chunks.ids += part.ids; chunks.titles += part.titles
policies = {}
for budget in (128, 256):
    policies["sllm", budget] = EvictionPolicy(StreamingLLMScorer(4), budget, min(64, budget // 2), 4)
    base = book.recipe_for(budget)
    start = Recipe("qfilters", 0.25, 4, "uniform")
    for tag, r in (("shipped", base), ("start", start)):
        for w in (0.0, 0.5, 1.0):
            one = RecipeBook({budget: replace(r, novelty_weight=w)}, book.sensitivity, 2048, score_spread=book.score_spread)
            policies[f"{tag}+w{w:g}", budget] = one.policy(budget, lm.model, ScorerInputs(filters=filters), 2048)
res = evaluate_chunks(lm.model, chunks, policies, score_last=1024)
for k in policies:
    print(k, round(res.perplexity(*k), 3), flush=True)
