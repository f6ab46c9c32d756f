"""GPU decode throughput at a long context: QFiltersCache (bounded KV) vs the default full cache.

    python bench/bench_cache_gpu.py --model smollm2                      # embedded SmolLM2-135M
    python bench/bench_cache_gpu.py --model meta-llama/Llama-3.1-8B --budget 1024 --filters nthngdy/Llama-3.1-8B_qfilt

bf16 weights, sdpa with torch's FLASH_ATTENTION backend forced (``torch.nn.attention.sdpa_kernel``), a random
``--context``-token prompt (8k by default), then ``--new-tokens`` greedy steps timed one by one (CUDA-synchronized,
prefill and warm-up excluded). Filter values do not change the cost of scoring, so random filters are used unless
``--filters`` names an artifact. Needs CUDA; exits with status 2 and a message otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _decode(model: Any, prompt: Any, cache: Any, new_tokens: int, warmup: int) -> dict[str, float]:
    import torch

    from qfilters.cache import cache_kwargs

    pass_cache = cache_kwargs(model, cache)  # once: it inspects the forward signature
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(prompt, **pass_cache, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    token = out.logits[:, -1:].argmax(dim=-1)  # [B, 1]
    for _ in range(warmup):
        token = model(token, **pass_cache, use_cache=True).logits[:, -1:].argmax(dim=-1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        token = model(token, **pass_cache, use_cache=True).logits[:, -1:].argmax(dim=-1)
    torch.cuda.synchronize()
    decode_s = time.perf_counter() - t0
    return {"prefill_s": prefill_s, "decode_s": decode_s, "tok_per_s": new_tokens * prompt.shape[0] / decode_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="Hub id, local directory or embedded alias (smollm2, gemma3)")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--budget", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--filters", default=None, help="artifact directory or Hub repo (default: random filters)")
    ap.add_argument("--backend", choices=("flash", "auto"), default="flash",
                    help="flash: force torch's FLASH_ATTENTION SDPA backend; auto: let torch choose (needed for models "
                         "whose sliding-window layers pass a mask, e.g. Gemma-3 beyond its window)")
    args = ap.parse_args()

    import torch

    from qfilters.policy import check_budget

    for b in args.budget:
        check_budget(b, args.window)  # fail before minutes of model loading
    if not torch.cuda.is_available():
        print("bench_cache_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a GPU machine, e.g. `python bench/bench_cache_gpu.py --model smollm2`.", file=sys.stderr)
        return 2
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import DynamicCache

    from qfilters.cache import QFiltersCache
    from qfilters.models import load_model
    from qfilters.scorers import QFilterScorer

    lm = load_model(args.model, device="cuda", dtype="bfloat16", attn_implementation="sdpa")
    model, info = lm.model, lm.info
    if args.filters:
        from qfilters.artifact import QFilters

        filters = QFilters.from_pretrained(args.filters, expected_shape=info.filter_shape).filters
    else:
        filters = torch.randn(*info.filter_shape, generator=torch.Generator().manual_seed(0))
    scorer = QFilterScorer(filters)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, lm.tokenizer.vocab_size - 1, (args.batch, args.context), generator=gen).cuda()
    print(f"{torch.cuda.get_device_name()} | {info.model_id} bf16 sdpa[FLASH] | batch {args.batch}, context "
          f"{args.context}, {args.new_tokens} timed decode steps, window {args.window}, filters "
          f"{args.filters or 'random'}")
    print(f"{'cache':<22}{'prefill s':>10}{'decode tok/s':>14}{'x full':>8}{'peak GiB':>10}{'KV/layer':>10}")
    runs: list[tuple[str, Any]] = [("full (DynamicCache)", lambda: DynamicCache(config=model.config))]
    runs += [(f"QFilters budget {b}", lambda b=b: QFiltersCache(model, scorer, b, args.window))
             for b in args.budget if b < args.context]
    base = None
    backends = [SDPBackend.FLASH_ATTENTION]
    if args.backend == "auto":
        backends += [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with torch.inference_mode(), sdpa_kernel(backends):
        for label, make in runs:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            cache = make()
            try:
                r = _decode(model, prompt, cache, args.new_tokens, args.warmup)
            except RuntimeError as e:  # e.g. no flash kernel for this head_dim / GPU, or a masked layer
                print(f"{label:<22} failed: {e}\n(try --backend auto)")
                return 1
            base = base or r["tok_per_s"]
            kv = max(getattr(layer, "keys", None).shape[-2] for layer in cache.layers
                     if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4)
            print(f"{label:<22}{r['prefill_s']:>10.2f}{r['tok_per_s']:>14.1f}{r['tok_per_s'] / base:>8.2f}"
                  f"{torch.cuda.max_memory_allocated() / 2**30:>10.2f}{kv:>10}")
            del cache
    return 0


if __name__ == "__main__":
    sys.exit(main())
