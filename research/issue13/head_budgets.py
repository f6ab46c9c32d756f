"""Would per-head budgets close issue 13's 0.50x at 128 on text the search never saw? A headroom diagnostic.

The shipped recipes give every KV head of a layer the same budget. DuoAttention's observation is that most heads only
read their recent tokens while a few (retrieval heads) read far back; the shipped book already measures which
(``needle_attention``, [layer][KV head]). Here, at the same total KV memory (sum of per-head budgets = the shipped
recipe's), the top-k heads by needle attention get ``factor`` x their layer's budget and the others share what is
left (floor: sinks + 2 slots + a window); each head keeps the recipe's window share of its own budget and its
scorer. Static per key, so the one-pass evaluator stays exact; the cache cannot run it today (its per-layer tensors
hold one length for all heads: real savings need ragged per-head storage).
Usage: .venv/bin/python research/issue13/head_budgets.py artifacts/smollm2-handbook-en --texts jargon python-docs
"""

from __future__ import annotations

import argparse
import json

from heldout import HERE, held_out, measure, patch_eviction_hook, shipped_book, shipped_variant, streamingllm

from qfilters import QFilters, load_model
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.recall_heads import top_heads

parser = argparse.ArgumentParser()
parser.add_argument("filters")
parser.add_argument("--docs", type=int, default=3)
parser.add_argument("--budget", type=int, default=128)
parser.add_argument("--variants", nargs="+", default=["18x3", "9x5", "27x2"], help="KxF: top K heads get F x")
parser.add_argument("--texts", nargs="+", default=["jargon", "python-docs"])
parser.add_argument("--out", default="head-budgets.json")
args = parser.parse_args() if __name__ == "__main__" else None  # importable (PerHeadPolicy)


def PerHeadPolicy(base: EvictionPolicy, budgets: list[int], share: float) -> EvictionPolicy:  # noqa: N802
    """A layer policy whose KV heads keep different numbers of keys (``budgets``, one per head): now the library's
    ``EvictionPolicy.per_head``, each head keeping the window ``share`` of its own budget."""
    windows = [min(b - base.n_sinks - 1, round(share * b)) for b in budgets]
    return EvictionPolicy.per_head(base.scorer, budgets, windows, base.n_sinks)


def per_head(policy: LayerwisePolicy, table: list[list[float]], k: int, factor: float, share: float
             ) -> LayerwisePolicy:
    layers = {i: p for i, p in policy.layers.items() if p is not None}
    n_heads = len(table[0])
    chosen = set(top_heads(table, k, sorted(layers)))
    total = sum(p.budget * n_heads for p in layers.values())
    big = {(i, h): round(factor * p.budget) for i, p in layers.items() for h in range(n_heads) if (i, h) in chosen}
    rest = [(i, h) for i, p in layers.items() for h in range(n_heads) if (i, h) not in chosen]
    # the others share what is left in proportion to their layer's budget
    left = total - sum(big.values())
    weight = sum(layers[i].budget for i, _ in rest)
    small = {(i, h): max(layers[i].n_sinks + 8, int(left * layers[i].budget / weight)) for i, h in rest}
    budgets = big | small
    assert sum(budgets.values()) <= total + len(rest), (sum(budgets.values()), total)
    return LayerwisePolicy({i: None if p is None else PerHeadPolicy(p, [budgets[i, h] for h in range(n_heads)], share)
                            for i, p in policy.layers.items()})


if __name__ == "__main__":
    patch_eviction_hook()
    filters = QFilters.from_pretrained(args.filters)
    book = shipped_book()
    table = book.needle_attention
    assert table is not None
    lm = load_model("smollm2")
    b = args.budget
    shipped = shipped_variant(book, b, lm, filters)
    share = book.recipe_for(b).window_share
    policies = {("streamingllm", b): streamingllm(b), ("recipe", b): shipped}
    for variant in args.variants:
        k, factor = variant.split("x")
        policies[f"recipe, top {k} heads x{factor}", b] = per_head(shipped, table, int(k), float(factor), share)
    out: dict = {"filters": args.filters, "budget": b, "docs": args.docs}
    measure(lm, {spec: held_out(lm, spec, args.docs) for spec in args.texts}, policies, out)
    (HERE / args.out).write_text(json.dumps(out, indent=1) + "\n")
