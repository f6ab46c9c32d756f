"""Issue 13's A1 and A2 for the per-KV-head allocation, measured through the PRODUCT's code (no research hook).

The validator now searches ``allocation="head"`` itself, but its full re-run (4 budgets, 5 passes, 90 head passes)
needs ~2 h on this 2-core machine and did not fit the session. This script measures what the search's allocation
axis decides, from the last validator run's converged recipes (validator-smollm2/by-layer/filters-qfilters.json): at every
budget the same recipe with ``allocation="head"`` (the only change), the KV-head sensitivity measured by the
validator's own function (``measure_head_sensitivity``, first search document, budget 128 = the sweep's middle).
1. On the search text (calibration only): the shipped recipe vs the head variant, per budget (the axis's decision).
2. Held out (6 x 2048 tokens, last 1024 scored; the search never saw them): austen, python-docs and ``--texts``.
3. Passkeys as the validator runs them (48 needles, 1024-token Austen contexts) at 128 / 256 / 512.
Everything goes through qfilters.recipes (RecipeBook.policy), qfilters.evaluate and qfilters.passkey unpatched.
Usage: .venv/bin/python research/issue13/head_recipe.py artifacts/smollm2-handbook-en [--reuse head-sensitivity.json]
Writes head-recipe.json and head-recipe-filters/ (the filters with the head book, loadable by QFiltersCache).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from heldout import HERE, SEQ_LEN, held_out, measure, search_text, shipped_book, streamingllm

from qfilters import QFilters, load_corpus, load_model, passkey
from qfilters.evaluate import perplexity
from qfilters.policy import EvictionPolicy, LayerwisePolicy
from qfilters.policy_table import ScorerInputs
from qfilters.scorers import QFilterScorer

BUDGETS = (64, 128, 256, 512)
parser = argparse.ArgumentParser()
parser.add_argument("filters")
parser.add_argument("--reuse", default=None, help="head-sensitivity JSON of research/issue13 (checked on --check "
                    "heads against the validator's function, then reused: saves 90 passes)")
parser.add_argument("--check", type=int, default=3, help="heads of the first compressed layer re-measured")
parser.add_argument("--texts", nargs="*", default=[])
parser.add_argument("--out", default="head-recipe.json")
parser.add_argument("--only-head", action="store_true", help="held out and passkeys: measure the head recipe alone and "
                    "take StreamingLLM's and the shipped recipe's numbers from validator-smollm2/by-layer/report.json (the same "
                    "documents and code; the full-cache perplexity is re-measured and checked against it)")
parser.add_argument("--skip-search-text", action="store_true")
args = parser.parse_args()

filters = QFilters.from_pretrained(args.filters)
lm = load_model("smollm2")
book = shipped_book()
n_layers, n_heads = lm.model.config.num_hidden_layers, lm.model.config.num_key_value_heads
doc = search_text(lm).ids[0]
out: dict = {"filters": args.filters, "budgets": list(BUDGETS), "seconds": {}}
t0 = time.time()
if args.reuse:
    stored = json.loads((HERE / args.reuse).read_text())["head_sensitivity"]
    table = [[0.0] * n_heads for _ in range(n_layers)]
    for key, value in stored.items():
        i, h = (int(x) for x in key.split("."))
        table[i][h] = value
    # the validator's measurement of the first heads, to show the reused table is the same quantity
    full = perplexity(lm.model, doc, None, 1024).nll_sum
    check = {}
    for h in range(args.check):
        alone = EvictionPolicy.per_head(QFilterScorer(filters), [128 if g == h else SEQ_LEN for g in range(n_heads)],
                                        [64] * n_heads)
        nll = perplexity(lm.model, doc, LayerwisePolicy({0: alone}), 1024).nll_sum
        check[f"0.{h}"] = {"library": round((nll - full) / 1024, 6), "reused": table[0][h]}
    out["sensitivity_check"] = check
    print("check", check, flush=True)
else:
    from qfilters.data.chunks import EvalChunks
    from qfilters.validation.recipe_search import measure_head_sensitivity
    from qfilters.validation.settings import ValidationSettings

    settings = ValidationSettings(eval_seq_len=SEQ_LEN, score_last=1024, budgets=BUDGETS)
    chunks = EvalChunks(SEQ_LEN, ids=[doc])
    table = measure_head_sensitivity(lm, chunks, filters, 128, settings, perplexity(lm.model, doc, None, 1024).nll_sum)
out["seconds"]["sensitivity"] = round(time.time() - t0)
head_book = replace(book, head_sensitivity=tuple(tuple(row) for row in table),
                    by_budget={b: replace(r, allocation="head") for b, r in book.by_budget.items()})
head_book = replace(head_book, searched_on=book.searched_on + "; allocation moved to 'head' by head_recipe.py")
filters.with_recipe(head_book).save_pretrained(HERE / "head-recipe-filters")
out["recipe"] = {str(b): r.label for b, r in head_book.by_budget.items()}

inputs = ScorerInputs(filters=filters)
policies: dict = {}
for b in BUDGETS:
    policies["streamingllm", b] = streamingllm(b)
    policies["recipe", b] = book.policy(b, lm.model, inputs, SEQ_LEN)
    policies["head recipe", b] = head_book.policy(b, lm.model, inputs, SEQ_LEN)
    per = [x for p in policies["head recipe", b].layers.values() if p is not None for x in p.head_budgets]
    assert sum(per) <= b * len(per), (b, sum(per))  # never more memory than the shipped recipe
    out.setdefault("head_budget_span", {})[str(b)] = [min(per), sorted(per)[len(per) // 2], max(per), sum(per)]
texts = {} if args.skip_search_text else {"search text": search_text(lm)}
texts |= {s: held_out(lm, s) for s in ["austen", "python-docs", *args.texts]}
if args.only_head:
    from qfilters.evaluate import evaluate_chunks

    report = json.loads((HERE / "validator-smollm2/by-layer/report.json").read_text())
    for name, chunks in texts.items():
        (section,) = [p for p in report["perplexity"] if p["dataset"]["spec"] == name]
        sllm = {r["budget"]: r["perplexity"] for r in section["rows"] if r["policy"] == "streamingllm"}
        shipped = {r["budget"]: r["perplexity"] for r in section["rows"] if r["policy"] == "recipe"}
        t1 = time.time()
        res = evaluate_chunks(lm.model, chunks, {k: v for k, v in policies.items() if k[0] == "head recipe"},
                              score_last=1024)
        full = res.full_perplexity
        assert abs(full - section["full_perplexity"]) < 1e-3 * full, (full, section["full_perplexity"])
        for b in BUDGETS:
            ppl = res.perplexity("head recipe", b)
            for policy, value in (("streamingllm", sllm[b]), ("recipe", shipped[b]), ("head recipe", ppl)):
                ratio = (value - full) / (sllm[b] - full)
                out.setdefault("rows", []).append({"text": name, "policy": policy, "budget": b,
                                                   "perplexity": round(value, 4), "full": round(full, 4),
                                                   "gap_ratio_vs_streamingllm": round(ratio, 4),
                                                   "source": "measured" if policy == "head recipe" else "report"})
                print(f"{name:12s} {b:4d} {policy:24s} ppl {value:8.3f} ratio {ratio:.3f}", flush=True)
        out["seconds"][name] = round(time.time() - t1, 1)
else:
    measure(lm, texts, policies, out)

(HERE / args.out).write_text(json.dumps(out, indent=1) + "\n")  # the perplexities, before the passkeys
filler = "\n".join(d.text for d in load_corpus("austen").documents)
trials = passkey.make_trials(lm.tokenizer, filler, 48, 1024, 0)
pk: dict = {} if args.only_head else {"full": None}
for b in (128, 256, 512):
    if not args.only_head:
        pk[f"streamingllm {b}"] = streamingllm(b)
        pk[f"recipe {b}"] = book.policy(b, lm.model, inputs, 1024)
    pk[f"head recipe {b}"] = head_book.policy(b, lm.model, inputs, 1024)
t1 = time.time()
run = passkey.run_passkey(lm.model, trials, pk)
out["passkey"] = {k: sum(v) for k, v in run.hits.items()}
out["seconds"]["passkey"] = round(time.time() - t1)
print(out["passkey"], flush=True)
(HERE / args.out).write_text(json.dumps(out, indent=1) + "\n")
