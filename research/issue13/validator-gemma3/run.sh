#!/usr/bin/env bash
# Issue 13 acceptance 3: Gemma-3 (QK-norm) through the validator's recipe search.
set -euo pipefail
cd "$(dirname "$0")/../../.."
.venv/bin/qfilters validate gemma3 -c handbook:en -c handbook:fr -e austen -e python-docs --search-recipe \
  --tokens 4096 --calib-seq-len 512 --eval-seq-len 1024 --score-last 512 --max-docs 3 \
  --budget 64 --budget 128 --budget 256 --reference-budget 64 --out reports/issue13-gemma3
