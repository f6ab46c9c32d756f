#!/usr/bin/env bash
# Issue 13, through the product: the quickstart's filters (bash scripts/quickstart.sh: handbook:en, 65,536 tokens),
# the validator's recipe search on calibration text (handbook:en + handbook:fr), held out: austen and python-docs;
# passkey retrieval (48 needles, 1024-token austen contexts) at every budget.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-reports/issue13-recipe}
.venv/bin/qfilters validate smollm2 -c handbook:en -c handbook:fr -e austen -e python-docs \
  --filters artifacts/smollm2-handbook-en --search-recipe --recipe-docs 1 \
  --eval-seq-len 2048 --score-last 1024 --max-docs 6 \
  --budget 64 --budget 128 --budget 256 --budget 512 --reference-budget 128 \
  --tokens 8192 --calib-seq-len 1024 --passkey 48 --out "$OUT"
