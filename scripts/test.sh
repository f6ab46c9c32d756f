#!/usr/bin/env bash
# Set up (idempotent), then ruff, mypy and the whole test suite, real-model integration tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# lint and types first: seconds, and a finding fails the run before the 20-minute suite starts
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
