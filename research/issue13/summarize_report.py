"""Issue 13's acceptance numbers from a validator report.json: gap ratios vs StreamingLLM per text and budget,
passkeys per policy and budget, the chosen recipes and the verdict.  Usage: python summarize_report.py report.json"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

report = json.loads(open(sys.argv[1]).read())
for table in report["perplexity"]:
    gaps = {(r["policy"], r["budget"]): r["gap"] for r in table["rows"]}
    budgets = sorted({b for _, b in gaps if b is not None})
    print(f"\n{table['dataset']['spec']} (full ppl {table['full_perplexity']:.3f}), gap / gap(StreamingLLM) at {budgets}:")
    for policy in sorted({p for p, b in gaps if b is not None and p != "streamingllm"}):
        ratios = [gaps.get((policy, b), float("nan")) / gaps[("streamingllm", b)] for b in budgets]
        print(f"  {policy:40s} " + " / ".join(f"{x:.3f}" for x in ratios))
if report.get("passkey"):
    pk = report["passkey"]
    rows: dict[str, dict] = defaultdict(dict)
    for r in pk["rows"]:
        rows[r["policy"]][r["budget"]] = r["correct"]
    print(f"\npasskey ({pk['trials']} needles, {pk['context_tokens']} tokens):")
    for policy, by in rows.items():
        print(f"  {policy:40s} " + " / ".join(f"{b}:{c}" for b, c in sorted(by.items(), key=lambda x: x[0] or 0)))
print("\nchosen:")
for c in report["recipe"]["chosen"]:
    print(f"  {c['budget']}: {c['description']}")
print("\nverdict:", report["verdict"]["status"], report["verdict"]["reasons"])
