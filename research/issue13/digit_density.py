"""Why content novelty finds the passkey in Austen but not in handbook:en (the retrieval gate's filler): is it the
numbers? Handbook text has 34x Austen's digits per character (3.74 vs 0.11 per 1000), so a five-digit key is less
novel there. Passkey test (48 needles, 1024-token contexts, seed 0, 128 / 256 / 512) on handbook:en filler as is and
with every digit deleted, for StreamingLLM, K-norm, content novelty (windows 64 and 16) and the SnapKV reference (real attention of the
context's last 32 queries: is the needle findable at all?). A diagnostic, not a gate change:
deleting digits from calibration text to make the test pass would be tuning the test.
Usage: .venv/bin/python research/issue13/digit_density.py
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from heldout import HERE

from qfilters import load_corpus, load_model
from qfilters.architecture import compressed_layers
from qfilters.passkey import SnapKV, make_trials, run_passkey
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.rope import rope_frequencies
from qfilters.scorers import ContentNoveltyScorer, KNormScorer, StreamingLLMScorer

BUDGETS = (128, 256, 512)

if __name__ == "__main__":
    lm = load_model("smollm2")
    layers = compressed_layers(lm.model)
    novelty = ContentNoveltyScorer(frequencies=rope_frequencies(lm.model))
    policies: dict[str, Any] = {"full": None}
    for b in BUDGETS:
        policies[f"streamingllm@{b}"] = LayerwisePolicy.uniform(EvictionPolicy(StreamingLLMScorer(4), b,
                                                                               min(64, b // 2)), layers)
        policies[f"knorm@{b}"] = LayerwisePolicy.uniform(EvictionPolicy(KNormScorer(), b, min(64, b // 2), 4), layers)
        policies[f"snapkv@{b}"] = SnapKV(b)
        for w in (min(64, b // 2), 16):
            policies[f"content-novelty w{w}@{b}"] = LayerwisePolicy.uniform(EvictionPolicy(novelty, b, w), layers)
    text = "\n".join(d.text for d in load_corpus("handbook:en").documents)
    fillers = {"handbook:en": text, "handbook:en, digits deleted": re.sub(r"\d", "", text)}
    out: dict = {"trials": 48, "context": 1024, "seed": 0, "found": {}, "seconds": {}}
    for name, filler in fillers.items():
        t0 = time.time()
        run = run_passkey(lm.model, make_trials(lm.tokenizer, filler, 48, 1024, 0), policies)
        out["seconds"][name] = round(time.time() - t0, 1)
        out["found"][name] = {label: sum(hits) for label, hits in run.hits.items()}
        for label, hits in run.hits.items():
            print(f"{name:28s} {label:28s} {sum(hits):3d}/{len(hits)}", flush=True)
    (HERE / "digit-density.json").write_text(json.dumps(out, indent=1) + "\n")
