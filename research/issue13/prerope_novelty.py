"""Novelty measured before RoPE. NoveltyScorer scores -cos(k_t, k_0 + ... + k_t) on the cached, post-RoPE keys: the
running sum of rotated keys cancels in the fast-rotating dimensions, so the cosine mostly reads the few slow ones.
Undoing the rotation first (exact: the position is known; O(d) per key, still causal and static) compares what the
keys say, not where they are. Passkey test (kvpress protocol, 48 needles, 1024-token contexts, seed 0) on Austen
filler (held out) and handbook:en filler (the retrieval gate's calibration text), at 128 / 256 / 512, against
StreamingLLM, post-RoPE novelty and the shipped recipe. First written with its own inverse RoPE and a patched
NoveltyScorer; now the library's (qfilters.rope, ContentNoveltyScorer), which this measurement led to.
Usage: .venv/bin/python research/issue13/prerope_novelty.py artifacts/smollm2-handbook-en [trials]
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from heldout import HERE, shipped_book

from qfilters import QFilters, load_corpus, load_model
from qfilters.architecture import compressed_layers
from qfilters.passkey import make_trials, run_passkey
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.policy_table import ScorerInputs
from qfilters.rope import rope_frequencies
from qfilters.scorers import ContentNoveltyScorer, NoveltyScorer, StreamingLLMScorer

BUDGETS = (128, 256, 512)


if __name__ == "__main__":
    filters = QFilters.from_pretrained(sys.argv[1])
    n_trials = int(sys.argv[2]) if len(sys.argv) > 2 else 48
    lm = load_model("smollm2")
    layers = compressed_layers(lm.model)
    scorers = {"streamingllm": StreamingLLMScorer(4), "novelty": NoveltyScorer(),
               "prerope-novelty": ContentNoveltyScorer(frequencies=rope_frequencies(lm.model))}
    book = shipped_book()
    policies: dict[str, Any] = {"full": None}
    for b in BUDGETS:
        for name, scorer in scorers.items():
            policies[f"{name}@{b}"] = LayerwisePolicy.uniform(EvictionPolicy(scorer, b, min(64, b // 2)), layers)
            if name != "streamingllm":
                policies[f"{name} w16@{b}"] = LayerwisePolicy.uniform(EvictionPolicy(scorer, b, 16), layers)
        policies[f"shipped recipe@{b}"] = book.policy(b, lm.model, ScorerInputs(filters=filters), 1024)
    out: dict = {"filters": sys.argv[1], "trials": n_trials, "context": 1024, "seed": 0, "found": {}, "seconds": {}}
    for spec in ("austen", "handbook:en"):
        text = "\n".join(d.text for d in load_corpus(spec).documents)
        trials = make_trials(lm.tokenizer, text, n_trials, 1024, 0)
        t0 = time.time()
        run = run_passkey(lm.model, trials, policies)
        out["seconds"][spec] = round(time.time() - t0, 1)
        out["found"][spec] = {label: sum(hits) for label, hits in run.hits.items()}
        for label, hits in run.hits.items():
            print(f"{spec:12s} {label:32s} {sum(hits):3d}/{len(hits)}", flush=True)
    (HERE / "prerope-novelty.json").write_text(json.dumps(out, indent=1) + "\n")
