"""Shared by the issue-13 diagnostics that change one field of the shipped recipes and measure them: the shipped
book, the search text as the validator reads it, one evaluation pass per text with gap ratios vs StreamingLLM, and
a one-pass hook that lets a policy read the queries and values the library's scorers never see."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from qfilters import load_corpus, onepass
from qfilters.architecture import COMPRESS, layer_kinds
from qfilters.data.chunks import EvalChunks, select_chunks
from qfilters.evaluate import evaluate_chunks
from qfilters.eviction import eviction_horizon
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.policy_table import ScorerInputs
from qfilters.recipes import RecipeBook
from qfilters.scorers import StreamingLLMScorer

HERE = Path(__file__).parent
SEQ_LEN = 2048


def shipped_book() -> RecipeBook:
    """The recipes the last validator run shipped (validator-smollm2/by-layer/filters-qfilters.json)."""
    return RecipeBook.from_dict(json.loads((HERE / "validator-smollm2/by-layer/filters-qfilters.json").read_text())["recipe"])


def streamingllm(budget: int) -> EvictionPolicy:
    """The validator's baseline at ``budget``: 4 sinks, window min(64, budget // 2)."""
    return EvictionPolicy(StreamingLLMScorer(4), budget, min(64, budget // 2), 4)


def shipped_variant(book: RecipeBook, budget: int, lm: Any, filters: Any, context_length: int = SEQ_LEN,
                    **change: Any) -> LayerwisePolicy:
    """The shipped recipe at ``budget`` with ``change`` applied (same sensitivity and spreads), for contexts of
    ``context_length`` tokens (whole layers are paid for at that length)."""
    one = replace(book, by_budget={budget: replace(book.recipe_for(budget), **change)}, context_length=SEQ_LEN)
    return one.policy(budget, lm.model, ScorerInputs(filters=filters), context_length)


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


def with_policy_class(policy: LayerwisePolicy, cls: type[EvictionPolicy], **fields: Any) -> LayerwisePolicy:
    """``policy`` with every compressed layer's policy rebuilt as ``cls`` (an EvictionPolicy subclass) plus
    ``fields``."""
    return LayerwisePolicy({i: None if p is None else cls(p.scorer, p.budget, p.window, p.n_sinks, **fields)
                            for i, p in policy.layers.items()})


def patch_eviction_hook() -> None:
    """Route the one-pass evaluator through :func:`_research_hook`: a layer policy with ``adjust_scores(scores,
    layer_idx, query, key, value)`` changes its keys' scores from what the model computed, and one with
    ``horizon(scores)`` replaces the eviction closed form, and one with ``attend(module, query, key, value, mask,
    horizon)`` replaces the attention over the visible keys; other policies run as in the library."""
    onepass.eviction_hook = _research_hook


def _research_hook(model: Any, policy: Any) -> Any:
    kinds = layer_kinds(model)

    def hook(module, query, key, value, attention_mask, base_fn, **kwargs):
        layer = policy.for_layer(module.layer_idx) if kinds[module.layer_idx] == COMPRESS else None
        if layer is None:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        positions = torch.arange(query.shape[2], device=key.device)
        scores = layer.scores(key, module.layer_idx, positions)
        if hasattr(layer, "adjust_scores"):
            scores = layer.adjust_scores(scores, module.layer_idx, query, key, value)
        if hasattr(layer, "horizon"):
            horizon = layer.horizon(scores)
        else:
            horizon = eviction_horizon(scores, layer.budget - layer.window, layer.window)
        kwargs.pop("is_causal", None)
        if hasattr(layer, "attend"):
            return layer.attend(module, query, key, value, attention_mask, horizon)
        return onepass.evicted_attention(module, query, key, value, attention_mask, horizon, base_fn,
                                         onepass._block_size(layer.budget), **kwargs)

    return hook
