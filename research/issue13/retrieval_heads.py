"""Retrieval heads: does content novelty in the few KV heads that read a passkey keep needles without the
perplexity that novelty in whole layers costs?

Why: under the kvpress protocol the context is prefilled with full attention, so a needle's hidden states are
exact; only the question's queries lose keys. They read the needle through a few heads (Wu et al. 2024, "retrieval
heads"). Content novelty in half the layers keeps needles at 128 (15 / 48 on Austen) but costs 0.05x of gap ratio;
in a handful of heads it may keep them for much less.

Step 1 (calibration text only): qfilters.recall_heads.needle_attention on 16 passkey trials in handbook:en filler
(seed 1; the gate's trials use seed 0), full cache.
Step 2: the shipped recipes with ``recall_heads`` = k (those heads rank old keys by content novelty alone), k in
``KS`` per budget: passkeys (48, 1024 tokens, seed 0) in held-out Austen and in the gate's handbook:en, perplexity
gap vs StreamingLLM on held-out Austen (6 x 2048, last 1024) and on the search text.
An earlier run of this script (before the library had recall heads) boosted the heads' blend weight x1000 instead;
its numbers are in BENCHMARKS.md beside these.
Writes retrieval-heads.json and retrieval-heads.png (the needle attention per head; needles against gap ratio).
Usage: .venv/bin/python research/issue13/retrieval_heads.py artifacts/smollm2-handbook-en   (measure, then plot)
       .venv/bin/python research/issue13/retrieval_heads.py --plot                          (re-plot the JSON)
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

import torch

from heldout import HERE, held_out, measure, search_text, shipped_book, shipped_variant, streamingllm

from qfilters import QFilters, load_corpus, load_model
from qfilters.passkey import make_trials, run_passkey
from qfilters.recall_heads import needle_attention, top_heads
from qfilters.recipes import RecipeBook

BUDGETS = (128, 256, 512)
KS = {128: (4, 5, 6, 7, 8, 16), 256: (4, 8, 16), 512: (4, 8)}
PASSKEY_CONTEXT = 1024


def with_recall(book: RecipeBook, table: torch.Tensor) -> RecipeBook:
    """``book`` carrying ``table`` as its needle attention (what the validator stores)."""
    return replace(book, needle_attention=tuple(tuple(float(x) for x in row) for row in table))


def plot(out: dict) -> None:
    """retrieval-heads.png: the needle attention per (layer, KV head); Austen needles against gap ratio per budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [0.8, 1, 1]})
    table = torch.tensor(out["needle_attention"])
    im = axes[0].imshow(table.T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axes[0].set(title="needle attention while the key is answered\n(16 handbook:en passkeys, full cache)",
                xlabel="layer", ylabel="KV head", yticks=range(table.shape[1]))
    fig.colorbar(im, ax=axes[0], fraction=0.05)
    for ax, b in zip(axes[1:], (128, 256), strict=True):
        rows = {r["policy"]: r for r in out["rows"] if r["text"] == "austen" and r["budget"] == b}
        found = out["passkey"]["austen"]
        for label in ("shipped", *(f"recall{k}" for k in KS[b])):
            x, y = rows[label]["gap_ratio_vs_streamingllm"], found[f"{label}@{b}"]
            ax.scatter(x, y, color="black" if label == "shipped" else "C0", zorder=3)
            ax.annotate("shipped (0 heads)" if label == "shipped" else label.replace("recall", "") + " heads", (x, y),
                        fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.axhline(found[f"streamingllm@{b}"], color="grey", ls="--", lw=0.8, label="StreamingLLM's needles")
        if b == 128:
            ax.axvline(0.5, color="red", ls="--", lw=0.8, label="gap 0.50x (acceptance 1 at 128)")
        else:
            ax.axhline(24, color="red", ls=":", lw=0.8, label="50% of full (acceptance 2 at 256)")
        ax.set(title=f"budget {b}: held-out Austen (full cache 48/48)", xlabel="perplexity gap / StreamingLLM's",
               ylabel="passkeys found of 48")
        ax.legend(fontsize=7, loc="center right" if b == 128 else "lower center")
    fig.tight_layout()
    fig.savefig(HERE / "retrieval-heads.png", dpi=120)


if __name__ == "__main__" and sys.argv[1:] == ["--plot"]:
    plot(json.loads((HERE / "retrieval-heads.json").read_text()))
elif __name__ == "__main__":
    filters = QFilters.from_pretrained(sys.argv[1])
    lm = load_model("smollm2")
    out: dict = {"filters": sys.argv[1], "ks": {str(b): list(k) for b, k in KS.items()}}
    t0 = time.time()
    calib = "\n".join(d.text for d in load_corpus("handbook:en").documents)
    found = needle_attention(lm.model, make_trials(lm.tokenizer, calib, 16, PASSKEY_CONTEXT, seed=1))
    out["seconds_finder"] = round(time.time() - t0, 1)
    out["needle_attention"] = [[round(float(x), 4) for x in row] for row in found]
    out["ranked_heads"] = [[i, h, round(float(found[i, h]), 4)] for i, h in top_heads(found, 24, range(30))]
    print("top heads", out["ranked_heads"][:12], flush=True)
    book = with_recall(shipped_book(), found)
    key_policies: dict = {"full": None}
    ppl_policies: dict = {}
    for b in BUDGETS:
        key_policies[f"streamingllm@{b}"] = ppl_policies["streamingllm", b] = streamingllm(b)
        for k in (0, *KS[b]):
            label = "shipped" if k == 0 else f"recall{k}"
            key_policies[f"{label}@{b}"] = shipped_variant(book, b, lm, filters, PASSKEY_CONTEXT, recall_heads=k)
            ppl_policies[label, b] = shipped_variant(book, b, lm, filters, recall_heads=k)
    out["passkey"] = {}
    for spec in ("austen", "handbook:en"):
        text = "\n".join(d.text for d in load_corpus(spec).documents)
        t0 = time.time()
        run = run_passkey(lm.model, make_trials(lm.tokenizer, text, 48, PASSKEY_CONTEXT, 0), key_policies)
        out["seconds_passkey_" + spec] = round(time.time() - t0, 1)
        out["passkey"][spec] = {label: sum(h) for label, h in run.hits.items()}
        print(spec, out["passkey"][spec], flush=True)
        (HERE / "retrieval-heads.json").write_text(json.dumps(out, indent=1) + "\n")
    measure(lm, {"austen": held_out(lm, "austen"), "search text": search_text(lm)}, ppl_policies, out)
    (HERE / "retrieval-heads.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out)
