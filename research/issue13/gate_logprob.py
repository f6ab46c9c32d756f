"""Could the retrieval gate see recall heads on calibration text? On handbook:en filler no policy retrieves needles
that are not recent (even SnapKV), so needles found only count recency. The key's teacher-forced log-probability is
finer: does it rank the candidates the gate would see (shipped recipes, novelty-layer and recall-head variants) as
held-out Austen's needle counts do? Passkeys 48 x 1024 tokens, seed 0, the gate's protocol.
Usage: .venv/bin/python research/issue13/gate_logprob.py artifacts/smollm2-handbook-en
"""

from __future__ import annotations

import json
import sys
import time

import torch

from heldout import HERE, shipped_book, shipped_variant, streamingllm
from retrieval_heads import with_recall

from qfilters import QFilters, load_corpus, load_model
from qfilters.passkey import make_trials, run_passkey

CONTEXT = 1024
VARIANTS = {"shipped": {}, "novelty 50%": {"novelty_layers": 0.5}, "novelty 100%": {"novelty_layers": 1.0},
            "recall4": {"recall_heads": 4}, "recall9": {"recall_heads": 9}, "recall18": {"recall_heads": 18}}

if __name__ == "__main__":
    filters = QFilters.from_pretrained(sys.argv[1])
    lm = load_model("smollm2")
    table = torch.tensor(json.loads((HERE / "retrieval-heads.json").read_text())["needle_attention"])
    book = with_recall(shipped_book(), table)
    policies: dict = {"full": None, "snapkv@256": None}
    from qfilters.passkey import SnapKV
    policies["snapkv@256"] = SnapKV(256)
    for b in (128, 256, 512):
        policies[f"streamingllm@{b}"] = streamingllm(b)
        for label, change in VARIANTS.items():
            policies[f"{label}@{b}"] = shipped_variant(book, b, lm, filters, CONTEXT, **change)
    out: dict = {"context": CONTEXT, "variants": VARIANTS}
    for spec in ("handbook:en", "austen"):
        text = "\n".join(d.text for d in load_corpus(spec).documents)
        t0 = time.time()
        run = run_passkey(lm.model, make_trials(lm.tokenizer, text, 48, CONTEXT, 0), policies)
        d = run.to_dict()
        out[spec] = {"correct": d["correct"], "mean_logprob": {k: round(v, 4) for k, v in d["mean_logprob"].items()},
                     "seconds": round(time.time() - t0, 1)}
        for k in policies:
            print(f"{spec:12s} {k:20s} {d['correct'][k]:3d} {d['mean_logprob'][k]:9.3f}", flush=True)
        (HERE / "gate-logprob.json").write_text(json.dumps(out, indent=1) + "\n")
