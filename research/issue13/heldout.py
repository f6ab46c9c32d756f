"""Shared by the issue-13 diagnostics that change one field of the shipped recipes and measure them: the shipped
book, the search text as the validator reads it, and one evaluation pass per text with gap ratios vs StreamingLLM."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from qfilters import load_corpus
from qfilters.data.chunks import EvalChunks, select_chunks
from qfilters.evaluate import evaluate_chunks
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.policy_table import ScorerInputs
from qfilters.recipes import RecipeBook
from qfilters.scorers import StreamingLLMScorer

HERE = Path(__file__).parent
SEQ_LEN = 2048


def shipped_book() -> RecipeBook:
    """The recipes the last validator run shipped (validator-smollm2/filters-qfilters.json)."""
    return RecipeBook.from_dict(json.loads((HERE / "validator-smollm2/filters-qfilters.json").read_text())["recipe"])


def streamingllm(budget: int) -> EvictionPolicy:
    """The validator's baseline at ``budget``: 4 sinks, window min(64, budget // 2)."""
    return EvictionPolicy(StreamingLLMScorer(4), budget, min(64, budget // 2), 4)


def shipped_variant(book: RecipeBook, budget: int, lm: Any, filters: Any, **change: Any) -> LayerwisePolicy:
    """The shipped recipe at ``budget`` with ``change`` applied (same sensitivity and spreads)."""
    one = RecipeBook({budget: replace(book.recipe_for(budget), **change)}, book.sensitivity, SEQ_LEN,
                     score_spread=book.score_spread)
    return one.policy(budget, lm.model, ScorerInputs(filters=filters), SEQ_LEN)


def search_text(lm: Any, docs: int = 1) -> EvalChunks:
    """The first ``docs`` documents of handbook:en and handbook:fr, as the validator's search reads them."""
    chunks = EvalChunks(SEQ_LEN)
    for spec in ("handbook:en", "handbook:fr"):
        part = select_chunks(lm.tokenizer, load_corpus(spec), SEQ_LEN, docs)
        chunks.ids += part.ids
        chunks.titles += [f"{spec}: {t}" for t in part.titles]
    return chunks


def held_out(lm: Any, spec: str, docs: int = 6) -> EvalChunks:
    return select_chunks(lm.tokenizer, load_corpus(spec), SEQ_LEN, docs)


def measure(lm: Any, texts: dict[str, EvalChunks], policies: dict[tuple[str, int], Any], out: dict) -> None:
    """One pass per text (last 1024 scored); appends a row per policy to ``out["rows"]`` and the wall time to
    ``out["seconds"]``. ``policies`` must hold ("streamingllm", budget) for every budget."""
    out.setdefault("rows", [])
    out.setdefault("seconds", {})
    for name, chunks in texts.items():
        t0 = time.time()
        res = evaluate_chunks(lm.model, chunks, policies, score_last=1024)
        full = res.full_perplexity
        for policy, budget in policies:
            ppl = res.perplexity(policy, budget)
            ratio = (ppl - full) / (res.perplexity("streamingllm", budget) - full)
            out["rows"].append({"text": name, "policy": policy, "budget": budget, "perplexity": round(ppl, 4),
                                "full": round(full, 4), "gap_ratio_vs_streamingllm": round(ratio, 4)})
            print(f"{name:12s} {budget:4d} {policy:24s} ppl {ppl:8.3f} ratio {ratio:.3f}", flush=True)
        out["seconds"][name] = round(time.time() - t0, 1)
