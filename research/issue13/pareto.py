"""Perplexity against retrieval: is there one recipe that meets acceptance points 1 and 2 together at 128 and 256?
Content novelty alone keeps needles (Austen passkeys 15 / 34 at 128 / 256) but loses perplexity (search-text gap
0.81x / 1.54x StreamingLLM's); the shipped recipes do the opposite (0.45x / 0.52x, 3 / 9 needles). Between them:
the shipped recipe with novelty ranking a growing share of the later layers, or blended in with more weight. Each
variant on held-out Austen (gap ratio vs StreamingLLM, 6 x 2048, last 1024 scored; passkeys found of 48, 1024-token
contexts, seed 0), on the search text and on the gate's handbook:en passkeys (what the validator could see).
Writes pareto.json and pareto.png (needles against gap ratio, one panel per budget).
Usage: .venv/bin/python research/issue13/pareto.py artifacts/smollm2-handbook-en   (measure, then plot)
       .venv/bin/python research/issue13/pareto.py --plot                              (re-plot pareto.json)
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

from heldout import HERE, held_out, measure, search_text, shipped_book, shipped_variant, streamingllm

from qfilters import QFilters, load_corpus, load_model
from qfilters.architecture import compressed_layers
from qfilters.passkey import make_trials, run_passkey
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.recipes import RecipeBook
from qfilters.rope import rope_frequencies
from qfilters.scorers import ContentNoveltyScorer

BUDGETS = (128, 256)
PASSKEY_CONTEXT = 1024


def variants(book: RecipeBook, budget: int) -> dict[str, dict[str, float]]:
    """The shipped recipe and its steps toward content novelty: the fields changed, by label."""
    out = {f"novelty in {int(100 * share)}% of layers": {"novelty_layers": share} for share in (0.0, 0.25, 0.5, 0.75, 1.0)}
    weight = book.recipe_for(budget).novelty_weight
    return out | {f"blend weight {w:g}": {"novelty_weight": w} for w in (1.0, 2.0, 4.0) if w != weight}


def plot(out: dict) -> None:
    """pareto.png: per budget, held-out Austen needles against gap ratio, with the acceptance lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BUDGETS), figsize=(7 * len(BUDGETS), 5.2))
    for ax, b in zip(axes, BUDGETS, strict=True):
        rows = {r["policy"]: r for r in out["rows"] if r["text"] == "austen" and r["budget"] == b}
        for i, (policy, row) in enumerate(sorted(rows.items())):
            found = out["passkey"]["austen"][f"{policy}@{b}"]
            label = "shipped recipe" if policy == "novelty in 0% of layers" else policy
            x = row["gap_ratio_vs_streamingllm"]
            ax.scatter(x, found, color="black" if policy in ("streamingllm", "novelty in 0% of layers") else f"C{i}",
                       zorder=3)
            ax.annotate(label, (x, found), fontsize=7, xytext=(4, 4 if i % 2 else -10), textcoords="offset points")
        ax.axvline(1.0, color="grey", lw=0.8, ls=":")
        if b == 128:
            ax.axvline(0.5, color="red", lw=0.8, ls="--", label="gap 0.50x (acceptance 1 at 128)")
        ax.axhline(out["passkey"]["austen"][f"streamingllm@{b}"], color="grey", lw=0.8, ls="--",
                   label="StreamingLLM's needles (acceptance 2: above)")
        if b == 256:
            ax.axhline(24, color="red", lw=0.8, ls=":", label="50% of full (acceptance 2 at 256)")
        ax.set(title=f"budget {b}: held-out Austen (full cache 48/48)", xlabel="perplexity gap / StreamingLLM's",
               ylabel="passkeys found of 48", xlim=(0.35, 1.1))
        ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(HERE / "pareto.png", dpi=120)


if __name__ == "__main__" and sys.argv[1:] == ["--plot"]:
    plot(json.loads((HERE / "pareto.json").read_text()))
elif __name__ == "__main__":
    filters = QFilters.from_pretrained(sys.argv[1])
    lm = load_model("smollm2")
    layers = compressed_layers(lm.model)
    book = shipped_book()
    content = ContentNoveltyScorer(frequencies=rope_frequencies(lm.model))
    ppl_policies: dict = {}
    key_policies: dict = {"full": None}
    recipes: dict = {}
    for b in BUDGETS:
        ppl_policies["streamingllm", b] = streamingllm(b)
        key_policies[f"streamingllm@{b}"] = streamingllm(b)
        alone = LayerwisePolicy.uniform(EvictionPolicy(content, b, min(64, b // 2), 4), layers)
        ppl_policies["content novelty alone", b] = alone
        key_policies[f"content novelty alone@{b}"] = alone
        for label, change in variants(book, b).items():
            recipes[f"{label}@{b}"] = replace(book.recipe_for(b), **change).to_dict()
            ppl_policies[label, b] = shipped_variant(book, b, lm, filters, **change)
            key_policies[f"{label}@{b}"] = shipped_variant(book, b, lm, filters, PASSKEY_CONTEXT, **change)
    out: dict = {"filters": sys.argv[1], "budgets": list(BUDGETS), "recipes": recipes, "passkey": {}}
    for spec in ("austen", "handbook:en"):
        text = "\n".join(d.text for d in load_corpus(spec).documents)
        t0 = time.time()
        run = run_passkey(lm.model, make_trials(lm.tokenizer, text, 48, PASSKEY_CONTEXT, 0), key_policies)
        out["seconds_passkey_" + spec] = round(time.time() - t0, 1)
        out["passkey"][spec] = {label: sum(hits) for label, hits in run.hits.items()}
        print(spec, out["passkey"][spec], flush=True)
    measure(lm, {"austen": held_out(lm, "austen"), "search text": search_text(lm)}, ppl_policies, out)
    (HERE / "pareto.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out)
