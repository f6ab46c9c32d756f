"""Calibration cost: throughput against a plain forward, and peak memory against the number of tokens.

    python bench/bench_calibration.py throughput --model smollm2 --tokens 16384
    python bench/bench_calibration.py memory --model smollm2 --dataset austen --small 16384 --large 262144

throughput: tokens/s of `qfilters.calibrate` versus `model(input_ids)` (the full causal LM, logits included) on the
same batches; target ratio >= 1.08. memory: each size runs in a fresh process and reports its peak RSS; target
growth <= 5% from the small to the large run (statistics are fixed-size, so memory must not follow the token count).
The memory runs fix glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_): with its default *dynamic* threshold, freed
attention buffers migrate to the heap and fragment it, so peak RSS creeps up with the number of batches whatever
the algorithm holds. Set the same variable when calibrating on very long runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def _chunks(lm, spec: str, tokens: int, seq_len: int):
    from qfilters.data import iter_token_chunks, load_corpus

    return list(iter_token_chunks(lm.tokenizer, load_corpus(spec), seq_len, tokens))


def throughput(args: argparse.Namespace) -> dict:
    from qfilters.calibrate import CalibrationConfig, calibrate
    from qfilters.data import load_corpus
    from qfilters.models import load_model

    lm = load_model(args.model)
    corpus = load_corpus(args.dataset)
    chunks = _chunks(lm, args.dataset, args.tokens, args.seq_len)
    batches = [torch.tensor(chunks[i : i + args.batch_size]) for i in range(0, len(chunks), args.batch_size)]
    batches = [b for b in batches if b.shape[0] == args.batch_size]
    n_tokens = sum(b.numel() for b in batches)
    config = CalibrationConfig(max_tokens=n_tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                               checkpoint_every=n_tokens)
    plain, capture = [], []
    for _ in range(args.repeats):  # interleave the two so drift in machine load hits both alike
        start = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                lm.model(input_ids=b, use_cache=False)
        plain.append(n_tokens / (time.perf_counter() - start))
        result = calibrate(lm, [corpus], config)
        capture.append(result.tokens / result.seconds)
    best_plain, best_capture = max(plain), max(capture)
    return {
        "bench": "calibration_throughput",
        "model": lm.info.model_id,
        "tokens": n_tokens,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "plain_forward_tok_s": round(best_plain, 1),
        "calibration_tok_s": round(best_capture, 1),
        "ratio": round(best_capture / best_plain, 3),
        "threads": torch.get_num_threads(),
    }


def _peak_rss_one(args: argparse.Namespace) -> dict:
    from qfilters.calibrate import CalibrationConfig, calibrate
    from qfilters.data import load_corpus
    from qfilters.models import load_model

    lm = load_model(args.model)
    corpus = load_corpus(args.dataset)
    config = CalibrationConfig(max_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size)
    result = calibrate(lm, [corpus], config)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if result.tokens < args.tokens:
        raise SystemExit(f"{args.dataset} ran out after {result.tokens} tokens (< {args.tokens}); use a larger corpus")
    return {"tokens": result.tokens, "peak_rss_mib": round(peak_mib, 1), "seconds": round(result.seconds, 1)}


def memory(args: argparse.Namespace) -> dict:
    runs = {}
    for size in (args.small, args.large):
        cmd = [sys.executable, __file__, "_peak", "--model", args.model, "--dataset", args.dataset,
               "--tokens", str(size), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(1 << 20))}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        runs[size] = json.loads(out.strip().splitlines()[-1])
    small, large = runs[args.small], runs[args.large]
    return {
        "bench": "calibration_memory",
        "model": args.model,
        "small": small,
        "large": large,
        "growth": round(large["peak_rss_mib"] / small["peak_rss_mib"] - 1, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["throughput", "memory", "_peak"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dataset", default="handbook:en")
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", type=int, default=16_384)
    parser.add_argument("--large", type=int, default=262_144)
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    result = {"throughput": throughput, "memory": memory, "_peak": _peak_rss_one}[args.mode](args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
