"""What do per-head budgets cost at decode time? Ragged storage + a per-head key mask vs equal heads, same memory.

    python bench/bench_per_head_decode.py --filters artifacts/smollm2-handbook-en   # SmolLM2, CPU, ~2 min

Both caches hold the same total number of keys per layer (budget x KV heads): the uniform policy gives every head
``--budget``; the per-head one splits the same sum unevenly (0.5x, 1x, 1.5x ... of the budget, cycling over heads,
rescaled to the same sum). Each run: a ``--context``-token prefill of Austen, then ``--new`` greedy tokens, timed
per decoded token (median of ``--repeats``). Prints one JSON object (``--out`` keeps it): ms/token for each and the
ratio per-head / uniform (the cost of the padding, the mask and the per-head eviction loop).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _split(budget: int, heads: int) -> list[int]:
    raw = [(0.5, 1.0, 1.5)[h % 3] for h in range(heads)]
    scale = budget * heads / sum(raw)
    out = [max(8, round(x * scale)) for x in raw]
    out[-1] += budget * heads - sum(out)
    return out


def main() -> None:
    import torch

    from qfilters import QFilters, QFiltersCache, QFilterScorer, cache_kwargs
    from qfilters.attention import route_through_qfilters
    from qfilters.data import load_corpus
    from qfilters.models import load_model
    from qfilters.policy import EvictionPolicy

    parser = argparse.ArgumentParser()
    parser.add_argument("--filters", required=True)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model("smollm2")
    route_through_qfilters(lm.model)  # both caches then run the same attention function (the per-head one needs it)
    scorer = QFilterScorer(QFilters.from_pretrained(args.filters))
    text = load_corpus("austen").documents[0].text
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, : args.context]
    heads = int(lm.model.config.num_key_value_heads)
    budgets = _split(args.budget, heads)
    policies = {"uniform": EvictionPolicy(scorer, args.budget, args.budget // 4),
                "per-head": EvictionPolicy.per_head(scorer, budgets, [b // 4 for b in budgets])}
    timings: dict[str, list[float]] = {name: [] for name in policies}
    outputs = {}
    for _ in range(args.repeats):
        for name, policy in policies.items():  # interleaved, so drift in machine load hits both alike
            cache = QFiltersCache(lm.model, policy)
            with torch.inference_mode():
                lm.model(ids, **cache_kwargs(lm.model, cache), use_cache=True)  # prefill (untimed)
                token = ids[:, -1:]
                start = time.perf_counter()
                for _ in range(args.new):
                    out = lm.model(token, **cache_kwargs(lm.model, cache), use_cache=True)
                    token = out.logits[:, -1:].argmax(dim=-1)
                timings[name].append(1000 * (time.perf_counter() - start) / args.new)
            stored = [sum(layer.stored_per_head) if hasattr(layer, "stored_per_head")
                      else int(layer.keys.shape[-2]) * heads for layer in cache.layers]
            outputs[name] = {"stored_keys_per_layer": sorted(set(stored))}
    result = {"budget": args.budget, "context": args.context, "new_tokens": args.new, "threads": args.threads,
              "head_budgets": budgets,
              "ms_per_token": {k: round(statistics.median(v), 2) for k, v in timings.items()},
              "runs_ms_per_token": {k: [round(x, 2) for x in v] for k, v in timings.items()},
              "memory": outputs}
    result["ratio_per_head_vs_uniform"] = round(result["ms_per_token"]["per-head"] / result["ms_per_token"]["uniform"],
                                                3)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
