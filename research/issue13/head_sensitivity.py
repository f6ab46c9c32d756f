"""Would per-head budgets by MEASURED sensitivity close issue 13's 0.50x at 128 on text the search never saw?

head_budgets.py moved budget to the heads that read passkeys (needle attention) and lost badly on jargon: those
heads are not the ones perplexity needs. The shipped sensitivity allocation measures per LAYER what compressing that
layer alone costs (NLL per token, stock Q-Filters at the budget, calibration text). Here the same measurement per KV
head (compress that head alone, all else full cache; first search document, as the validator does), then, at the
same total KV memory as the shipped recipe, per-head budgets = total x (u / n_heads + (1 - u) x s_h / sum s), floored
at sinks + a window + 8; each head keeps the recipe's window share of its own budget and its scorer. Static per key,
so the one-pass evaluator stays exact; the cache cannot run it (one length per layer: needs ragged storage).
Usage: .venv/bin/python research/issue13/head_sensitivity.py artifacts/smollm2-handbook-en [--texts jargon python-docs]
(issue 13's A1 protocol: --docs 6 --budgets 64 128 256 512 --uniform 0.5 --sensitivity head-sensitivity.json
--texts austen jargon python-docs --out head-sensitivity-a1.json; the per-head sensitivity is measured once, at 128)
"""

from __future__ import annotations

import argparse
import json
import time

from head_budgets import PerHeadPolicy
from heldout import (HERE, held_out, measure, patch_eviction_hook, search_text, shipped_book, shipped_variant,
                     streamingllm)

from qfilters import QFilters, load_model
from qfilters.onepass import perplexity
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.scorers import QFilterScorer

parser = argparse.ArgumentParser()
parser.add_argument("filters")
parser.add_argument("--docs", type=int, default=3)
parser.add_argument("--budget", type=int, default=128, help="where the sensitivity is measured")
parser.add_argument("--budgets", nargs="+", type=int, default=None, help="budgets evaluated (default: --budget)")
parser.add_argument("--sensitivity", default=None, help="reuse the head_sensitivity of an earlier output JSON")
parser.add_argument("--uniform", nargs="+", type=float, default=[0.5, 0.25], help="uniform share u of the allocation")
parser.add_argument("--needle", action="store_true", help="also: the same allocation by needle attention (the "
                    "book's, measured while calibration-text passkeys are answered) instead of measured sensitivity")
parser.add_argument("--needle-only", action="store_true", help="the needle-attention allocation only")
parser.add_argument("--no-search-text", action="store_true")
parser.add_argument("--texts", nargs="+", default=["jargon", "python-docs"])
parser.add_argument("--out", default="head-sensitivity.json")
args = parser.parse_args() if __name__ == "__main__" else None  # importable (by_sensitivity)


class OneHeadPolicy(EvictionPolicy):
    """Stock eviction on one KV head of a layer; the other heads keep every key (horizon = end of the sequence)."""

    def __init__(self, base: EvictionPolicy, head: int) -> None:
        super().__init__(base.scorer, base.budget, base.window, base.n_sinks)
        self.head = head

    def horizon(self, scores):
        from qfilters.eviction import eviction_horizon
        h = eviction_horizon(scores, self.budget - self.window, self.window)
        full = scores.new_full(h.shape, scores.shape[-1], dtype=h.dtype)
        full[:, self.head] = h[:, self.head]
        return full


def head_sensitivity(lm, chunk, filters, budget: int, window: int, layers: list[int], n_heads: int,
                     score_last: int = 1024) -> dict[tuple[int, int], float]:
    full = perplexity(lm.model, chunk, None, score_last).nll_sum
    base = EvictionPolicy(QFilterScorer(filters), budget, window)
    out = {}
    for i in layers:
        for h in range(n_heads):
            nll = perplexity(lm.model, chunk, LayerwisePolicy({i: OneHeadPolicy(base, h)}), score_last).nll_sum
            out[i, h] = (nll - full) / (score_last * chunk.shape[0])
        print(f"layer {i}: " + " ".join(f"{out[i, h]:.5f}" for h in range(n_heads)), flush=True)
    return out


def by_sensitivity(policy: LayerwisePolicy, sens: dict[tuple[int, int], float], uniform: float, share: float
                   ) -> LayerwisePolicy:
    layers = {i: p for i, p in policy.layers.items() if p is not None}
    n_heads = 1 + max(h for _, h in sens)
    keys = [(i, h) for i in layers for h in range(n_heads)]
    total = sum(p.budget * n_heads for p in layers.values())
    s = {k: max(sens[k], 0.0) for k in keys}
    s_sum = sum(s.values()) or 1.0
    budgets = {k: max(layers[k[0]].n_sinks + 16, int(total * (uniform / len(keys) + (1 - uniform) * s[k] / s_sum)))
               for k in keys}
    assert sum(budgets.values()) <= total + 16 * len(keys), (sum(budgets.values()), total)
    return LayerwisePolicy({i: None if p is None else PerHeadPolicy(p, [budgets[i, h] for h in range(n_heads)], share)
                            for i, p in policy.layers.items()}), budgets


if __name__ == "__main__":
    patch_eviction_hook()
    filters = QFilters.from_pretrained(args.filters)
    book = shipped_book()
    lm = load_model("smollm2")
    b = args.budget
    layers = sorted(i for i, p in shipped_variant(book, b, lm, filters).layers.items() if p is not None)
    n_heads = lm.model.config.num_key_value_heads
    t0 = time.time()
    if args.sensitivity:
        stored = json.loads((HERE / args.sensitivity).read_text())["head_sensitivity"]
        sens = {tuple(int(x) for x in k.split(".")): v for k, v in stored.items()}
    else:
        sens = head_sensitivity(lm, search_text(lm).ids[0], filters, b, min(64, b // 2), layers, n_heads)
    out: dict = {"filters": args.filters, "budget": b, "docs": args.docs,
                 "sensitivity_seconds": round(time.time() - t0),
                 "head_sensitivity": {f"{i}.{h}": round(v, 6) for (i, h), v in sens.items()}, "allocations": {}}
    policies = {}
    for budget in args.budgets or [b]:
        shipped = shipped_variant(book, budget, lm, filters)
        share = book.recipe_for(budget).window_share
        policies["streamingllm", budget] = streamingllm(budget)
        policies["recipe", budget] = shipped
        for u in args.uniform:
            if not args.needle_only:
                policy, budgets = by_sensitivity(shipped, sens, u, share)
                policies[f"recipe, head sensitivity u={u}", budget] = policy
                out["allocations"][f"{budget} u={u}"] = {f"{i}.{h}": v for (i, h), v in budgets.items()}
            if args.needle or args.needle_only:
                table = book.needle_attention
                needle = {(i, h): table[i][h] for i in layers for h in range(n_heads)}
                policies[f"recipe, needle attention u={u}", budget] = by_sensitivity(shipped, needle, u, share)[0]
    texts = {} if args.no_search_text else {"search text": search_text(lm)}
    texts |= {spec: held_out(lm, spec, args.docs) for spec in args.texts}
    measure(lm, texts, policies, out)
    (HERE / args.out).write_text(json.dumps(out, indent=1) + "\n")
