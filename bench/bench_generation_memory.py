"""The driver's memory per generated sample: the old driver-side settling vs the Ray Data one.

On the same samples, side by side in one run (SmolLM2's tokenizer, Ray's own vLLM processor
and stage over the fake vLLM engine of tests/fake_vllm.py, so no GPU is needed):
  - before: what the driver did until the top-up moved into Ray Data: take every sample
    (`take_all()`) and settle them itself (requests.expanded_snippets);
  - after: generate_snippets_on_ray, whose driver holds the short samples' indices and
    the counts; the snippets stay in the object store (GeneratedSnippets).
tracemalloc gives the peak of the driver's Python allocations during each; the run is
made at two sizes and the difference per sample is what grows with a run (Ray's fixed
bookkeeping cancels out).

Then the passes: the same generation with min_new_tokens 2 (about a third of the fake
engine's samples stop at once, so the refill rounds have work) at several `overgenerate`
settings: engine starts, samples generated and wall time. The fake engine starts in well
under a second; a vLLM engine for an 8B model takes tens of seconds to minutes (weights,
CUDA graphs), which is what each saved pass saves.

    python bench/bench_generation_memory.py --tokens 8 --per-token 100 400
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import fake_vllm  # noqa: E402
from tokdist_ray.config import GeneratedDataSource  # noqa: E402
from tokdist_ray.data.generation import backend, ray_backend, vllm_backend  # noqa: E402
from tokdist_ray.data.generation.requests import GenerationStats, expanded_snippets, fitted, stop_ids  # noqa: E402
from tokdist_ray.data.generation.rounds import RoundLedger  # noqa: E402
from tokdist_ray.data.snippets import bos_prefix  # noqa: E402
from tokdist_ray.vocab.merges import expand_with_merges  # noqa: E402
from tokdist_ray.vocab.models import load_tokenizer, resolve_model_path  # noqa: E402

MODEL = "bundled:smollm2"
WORDS = [" Krankenwagen", " Schmetterling", " Donaudampfschiff", " Quetzalcoatl", " Eichhörnchen",
         " Streichholzschachtel", " Zugspitze", " Rindfleisch"]


def peak(fn) -> tuple[object, int]:
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def before(expansion, tokens, per_token: int, source: GeneratedDataSource, snippet_len: int):
    """The old driver path on one pass of the same engine: every sample to the driver."""
    stop = stop_ids(expansion.tokenizer)
    from tokdist_ray.data.generation.vllm_backend import vllm_stage

    stage = vllm_stage(MODEL, source, snippet_len, stop, replicas=1)
    ledger = RoundLedger({i: per_token for i in range(len(tokens))}, 0, may_drop=False)
    samples = ray_backend.run_passes(stage, ledger, dict(enumerate(tokens)), bos_prefix(expansion.tokenizer),
                                     source, workers=1)[0]

    def on_driver():
        rows = [{**r, "source": "generated"} for r in samples.take_all() if not r["short"]]
        stats = GenerationStats(counts={t.text: 0 for t in tokens})
        table = expanded_snippets(rows, expansion, snippet_len, stats)
        return table.num_rows

    return peak(on_driver)


def after(expansion, tokens, per_token: int, source: GeneratedDataSource, snippet_len: int):
    return peak(lambda: ray_backend.generate_snippets_on_ray(MODEL, expansion, tokens, snippet_len, per_token,
                                                             source)[0].num_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--per-token", type=int, nargs=2, default=[100, 400])
    parser.add_argument("--snippet-len", type=int, default=50)
    args = parser.parse_args()

    resolve_model_path(MODEL)  # convert once, outside the measurements
    expansion = expand_with_merges(load_tokenizer(MODEL), WORDS)
    tokens = expansion.requested[: args.tokens]
    pythonpath = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})

    vllm_backend.processor_config = fake_vllm.processor_config_here(vllm_backend.processor_config, tempfile.mkdtemp())
    backend.vllm_installed = lambda: True  # the fake vllm is on the engines' path alone
    source = fitted(GeneratedDataSource(backend="vllm", min_new_tokens=0, concurrency=1, batch_size=64), args.snippet_len)
    try:
        results = {}
        for n in args.per_token:
            results[n] = {"before": before(expansion, tokens, n, source, args.snippet_len),
                          "after": after(expansion, tokens, n, source, args.snippet_len)}
        passes = {share: passes_at(expansion, tokens, args.per_token[0], args.snippet_len, share)
                  for share in (0.0, 0.1, 0.5)}
    finally:
        ray.shutdown()
    small, large = args.per_token
    samples = len(tokens) * (large - small)
    print(f"{len(tokens)} tokens, snippet_len {args.snippet_len}, {small} and {large} samples per token")
    print("| path   | peak at small | peak at large | driver bytes per sample |")
    print("| ------ | ------------- | ------------- | ----------------------- |")
    for path in ("before", "after"):
        lo, hi = results[small][path][1], results[large][path][1]
        print(f"| {path:6} | {lo / 1e6:10.1f} MB | {hi / 1e6:10.1f} MB | {(hi - lo) / samples:23.0f} |")
    print(f"\n{small} snippets per token wanted, min_new_tokens 2, refill_rounds 2")
    print("| overgenerate | passes | samples (rounds') | spare samples | seconds |")
    print("| ------------ | ------ | ----------------- | ------------- | ------- |")
    for share, (stats, seconds) in passes.items():
        print(f"| {share:12} | {stats.passes:6} | {stats.samples:17} | {stats.spare:13} | {seconds:7.1f} |")


def passes_at(expansion, tokens, per_token: int, snippet_len: int, share: float):
    source = GeneratedDataSource(backend="vllm", min_new_tokens=2, concurrency=1, batch_size=64, overgenerate=share)
    start = time.perf_counter()
    _, stats = ray_backend.generate_snippets_on_ray(MODEL, expansion, tokens, snippet_len, per_token, source)
    return stats, time.perf_counter() - start


if __name__ == "__main__":
    main()
