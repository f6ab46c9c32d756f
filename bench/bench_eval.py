"""One-pass evaluator vs token-by-token decoding with QFiltersCache: same perplexity, how much faster.

    .venv/bin/python bench/bench_eval.py                      # SmolLM2, 2048 tokens, budget 256, window 64
    .venv/bin/python bench/bench_eval.py --tokens 512 --scorer knorm

Runs the one-pass path first, in a process that has done nothing else heavy, so the growth of the peak RSS
(ru_maxrss) during it is its peak memory. Acceptance: one-pass >= 20x faster at 2048 tokens, same perplexity.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qfilters.evaluate import encode_document, perplexity, perplexity_reference
from qfilters.models import load_model
from qfilters.policy import EvictionPolicy
from qfilters.scorers import make_scorer


def _text() -> tuple[str, str]:
    try:
        from qfilters.data import load_corpus

        doc = load_corpus("austen").documents[0]
        return doc.text, f"austen: {doc.title}"
    except Exception as e:  # noqa: BLE001 - the bench must run even where the corpus package is missing
        root = Path(__file__).resolve().parent.parent / "qfilters"
        text = "\n".join(p.read_text() for p in sorted(root.rglob("*.py")))
        return text, f"qfilters sources ({e.__class__.__name__})"


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--score-last", type=int, default=1024)
    ap.add_argument("--scorer", default="qfilters", help="qfilters (random filters), knorm, streamingllm, random")
    ap.add_argument("--skip-reference", action="store_true", help="time the one-pass path only")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for both paths (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    model = lm.model
    text, source = _text()
    ids = torch.tensor([encode_document(lm.tokenizer, text, args.tokens)])
    filters = torch.randn(*lm.info.filter_shape, generator=torch.Generator().manual_seed(0))
    scorer = make_scorer(args.scorer, filters, n_sinks=4)
    print(f"model {lm.info.model_id}, {ids.shape[1]} tokens of {source}, scorer {args.scorer}, budget {args.budget}, "
          f"window {args.window}, last {args.score_last} scored, torch threads {torch.get_num_threads()}")

    with torch.inference_mode():
        model(ids[:, :32])  # warm-up (allocator, kernels) before measuring memory
    base_rss = _max_rss_mib()
    t0 = time.perf_counter()
    fast = perplexity(model, ids, EvictionPolicy(scorer, args.budget, args.window), score_last=args.score_last)
    t_fast = time.perf_counter() - t0
    peak = _max_rss_mib() - base_rss
    print(f"one-pass      : {t_fast:8.2f} s   ppl {fast.perplexity:.6f}   peak RSS growth {peak:.0f} MiB "
          f"(process peak {_max_rss_mib():.0f} MiB)")

    t0 = time.perf_counter()
    full = perplexity(model, ids, None, score_last=args.score_last)
    t_full = time.perf_counter() - t0
    print(f"full cache    : {t_full:8.2f} s   ppl {full.perplexity:.6f}   (plain forward, no eviction)")
    if args.skip_reference:
        return
    t0 = time.perf_counter()
    ref = perplexity_reference(model, ids, EvictionPolicy(scorer, args.budget, args.window), score_last=args.score_last)
    t_ref = time.perf_counter() - t0
    per_token_ms = t_ref / (ids.shape[1] - 1) * 1e3
    print(f"token-by-token: {t_ref:8.2f} s   ppl {ref.perplexity:.6f}   ({per_token_ms:.1f} ms/token)")
    print(f"speed-up {t_ref / t_fast:.1f}x   relative ppl difference {abs(fast.perplexity / ref.perplexity - 1):.2e}")


if __name__ == "__main__":
    main()
