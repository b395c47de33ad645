#!/usr/bin/env bash
# The GPU paths in one prepared run on one GPU, without Ray (bench/gpu_check.py says what each
# stage checks): the bf16 step with its rows, gradients and moments fp32, DDP against the
# single-process loop, ZeRO-1/2/3, resume, export, the output fit, one evaluation shard,
# 30,000 new rows at Llama-3-8B width, and step time, snippets/s, memory and MFU on a
# Llama-3-8B-shaped model at batch 16 and 32; the job's default output policy throughout.
#
#   bash bench/gpu_check.sh --prepare   # here: DeepSpeed, pyahocorasick and what they need that
#                                       # the GPU machine lacks, as Python 3.12 wheels in
#                                       # bench/wheels (gitignored)
#   bash bench/gpu_check.sh             # on the GPU machine, bench/wheels carried along
#                                       # (without them the ZeRO and eval stages say they skip)
#   bash bench/gpu_check.sh --dry-run   # on the CPU, tiny models: what the tests run
#
# Other options go to gpu_check.py: --stages, --fail-at, --json, --batches, --steps,
# --zero-ranks, --peak-tflops. Settings: PYTHON (python3; .venv/bin/python for --prepare),
# WHEELHOUSE (bench/wheels), SITE (/tmp/gpu-check-site, where the wheels are installed).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELHOUSE=${WHEELHOUSE:-bench/wheels}

if [ "${1:-}" = "--prepare" ]; then
  PYTHON=${PYTHON:-.venv/bin/python}
  version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  mkdir -p "$WHEELHOUSE"
  rm -f "$WHEELHOUSE"/*.whl
  # DeepSpeed ships no wheel: build its pure-Python one (ops compile when first used) against
  # this venv's torch, at this venv's version.
  "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(version deepspeed)" -w "$WHEELHOUSE"
  # DeepSpeed's needs that the GPU machine's image lacks (its list: /work/.library/device/KINDS.md),
  # and pyahocorasick, which the evaluation's snippet mining needs; pydantic-core and
  # pyahocorasick are compiled, so their wheels are the ones for the machine's Python 3.12.
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELHOUSE" "hjson==$(version hjson)" "pydantic==$(version pydantic)" \
    "pydantic-core==$(version pydantic-core)" "annotated-types==$(version annotated-types)" \
    "typing-inspection==$(version typing-inspection)" "typing-extensions==$(version typing-extensions)" \
    "pyahocorasick==$(version pyahocorasick)"
  du -ch "$WHEELHOUSE"/*.whl
  exit
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepspeed') is None or u.find_spec('ahocorasick') is None)" \
    && compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
  SITE=${SITE:-/tmp/gpu-check-site}
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELHOUSE"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1 \
  PYTHONWARNINGS=ignore::DeprecationWarning,ignore::FutureWarning  # the libraries' notes on their own internals
exec "$PYTHON" bench/gpu_check.py "$@"
