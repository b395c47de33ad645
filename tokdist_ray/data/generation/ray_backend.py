"""The Ray driver of generation: it runs the passes of a Ray Data stage, transformers on a CPU
actor pool (transformers_backend) or vLLM replicas through ray.data.llm (vllm_backend), as
backend.py chooses and sizes them, then settles the snippets (settling.py). The driver plans
and counts; every sample stays in Ray Data.

    token ranges (driver) -> requests -> engines -> samples (object store, per pass)
        -> the round ledger settles which samples each token keeps (driver: short flags only)
        -> settled snippets (expanded tokenizer, in Ray Data) -> sorted, written as parquet parts

Per pass the driver sees the (token index, sample index) of each short sample, and after
settling one int per snippet (its token index, for the counts): no sample's ids. The
snippets come out in a fixed order whatever the passes, actors or blocks (settling.py), the
order of the in-process API (local.py), so the API and the job give the same table.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, defaultdict
from functools import partial
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pyarrow as pa

from tokdist_ray.capacity import cluster_capacity, wait_for_nodes
from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.data.generation.backend import replica_bundle, resolve_backend, vllm_replicas
from tokdist_ray.data.generation.model_source import generation_config
from tokdist_ray.data.generation.requests import GenerationStats, fitted, sample_seed, stop_ids, wanted_counts
from tokdist_ray.data.generation.rounds import RoundLedger
from tokdist_ray.data.generation.settling import GeneratedSnippets, settled, token_ranks
from tokdist_ray.data.generation.transformers_backend import transformers_stage
from tokdist_ray.data.snippets import bos_prefix
from tokdist_ray.errors import user_errors_from_ray
from tokdist_ray.vocab.tokens import NewToken

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("tokdist_ray")


# ------------------------------------------------------------------ requests
def request_chunks(tokens: dict[int, NewToken], ranges: dict[int, tuple[int, int]], prefix: list[int],
                   chunk: int) -> list[dict]:
    """One item per at most `chunk` samples of one token, by prompt length then token index
    (so that a CPU batch needs little padding); the requests themselves are made in Ray Data."""
    items = [
        {"token": tokens[index].text, "token_index": index, "lo": start, "hi": min(hi, start + chunk),
         "prompt_ids": prefix + list(tokens[index].phrase_ids), "phrase_start": len(prefix)}
        for index, (lo, hi) in ranges.items()
        for start in range(lo, hi, chunk)
    ]
    return sorted(items, key=lambda c: (len(c["prompt_ids"]), c["token_index"], c["lo"]))


def chunk_requests(chunk: dict, seed: int) -> list[dict]:
    """A chunk's requests: one per sample, each with its own seed."""
    return [{"token": chunk["token"], "token_index": int(chunk["token_index"]), "sample_index": k,
             "seed": sample_seed(seed, chunk["token"], k), "prompt_ids": [int(i) for i in chunk["prompt_ids"]],
             "phrase_start": int(chunk["phrase_start"])}
            for k in range(int(chunk["lo"]), int(chunk["hi"]))]


def request_blocks(n_chunks: int, workers: int) -> int:
    """Blocks of request chunks (each at most one batch of one token): at least four per
    engine or actor, so that none idles while another has a queue, and about eight batches
    each when there are many."""
    return max(1, min(n_chunks, max(4 * workers, math.ceil(n_chunks / 8))))


# ------------------------------------------------------------------ the passes
def short_samples(samples: "ray.data.Dataset") -> dict[int, list[int]]:
    """token index -> its short samples' indices, streamed from the flags alone."""
    short: dict[int, list[int]] = defaultdict(list)
    for batch in samples.select_columns(["token_index", "sample_index", "short"]).iter_batches(batch_format="numpy"):
        flags = batch["short"].astype(bool)
        for index, sample in zip(batch["token_index"][flags].tolist(), batch["sample_index"][flags].tolist()):
            short[index].append(sample)
    return short


def snippet_counts(snippets: "ray.data.Dataset") -> Counter:
    """token index -> snippets, from the token_index column alone."""
    counts: Counter = Counter()
    for batch in snippets.select_columns(["token_index"]).iter_batches(batch_format="numpy"):
        values, n = np.unique(batch["token_index"], return_counts=True)
        counts.update(dict(zip(values.tolist(), n.tolist())))
    return counts


def run_passes(stage: Callable, ledger: RoundLedger, tokens: dict[int, NewToken], prefix: list[int],
               source: GeneratedDataSource, workers: int) -> list:
    """Generate until the ledger settles; each pass's samples stay in the object store."""
    import ray.data

    passes = []
    while ranges := ledger.next_pass():
        start = time.perf_counter()
        chunks = request_chunks(tokens, ranges, prefix, source.batch_size)
        # 0 CPUs: a trivial expansion that must not wait for the CPUs the actors hold
        requests = ray.data.from_items(chunks, override_num_blocks=request_blocks(len(chunks), workers)).flat_map(
            partial(chunk_requests, seed=source.seed), num_cpus=0)
        samples = stage(requests).materialize()
        short = short_samples(samples)
        ledger.record(ranges, short)
        passes.append(samples)
        log.info("generation pass %d: %d samples, %d short (%.1f s)", len(passes),
                 sum(hi - lo for lo, hi in ranges.values()), sum(len(s) for s in short.values()),
                 time.perf_counter() - start)
    return passes


def generation_stage(backend: str, model_path: str, source: GeneratedDataSource, snippet_len: int,
                     stop: list[int]) -> tuple[Callable, int]:
    """(requests -> samples, the number of engines or actors), once the first of them has a node."""
    if backend == "vllm":
        from tokdist_ray.data.generation.vllm_backend import vllm_stage

        capacity = cluster_capacity()
        replicas = vllm_replicas(source, capacity)
        # with no GPU up or to launch there is nothing to wait for: the engines go where the
        # processor config places them
        if capacity.gpu_replicas(source.tensor_parallel_size, source.accelerator_type):
            wait_for_nodes("generation (vLLM)", replica_bundle(source), replicas, capacity)
        return vllm_stage(model_path, source, snippet_len, stop, replicas), replicas
    actors = source.concurrency or 1  # actors resolve the model themselves: a bundled one materialises on each node
    wait_for_nodes("generation (transformers)", {"CPU": source.num_cpus_per_actor}, actors,
                   setting="generation.num_cpus_per_actor")
    return transformers_stage(model_path, source, snippet_len, stop, actors), actors


def generate_snippets_on_ray(
    model_path: str,
    expansion,
    tokens: Sequence[NewToken],
    snippet_len: int = 50,
    snippets_per_token: int | dict[str, int] = 100,
    source: GeneratedDataSource | None = None,
    token_indices: Sequence[int] | None = None,
) -> tuple[GeneratedSnippets, GenerationStats]:
    """Generated snippets of `tokens` (some of `expansion.tokens`; `token_indices` are
    their places there, by default 0, 1, ...), left on the cluster (GeneratedSnippets), plus
    per-token counts. `snippets_per_token` may be a dict token -> count (a top-up).

    The backend follows `source.backend`: vLLM replicas (`concurrency` of them, by default
    one per `tensor_parallel_size` GPUs the cluster has or can launch) through ray.data.llm,
    or a pool of `concurrency` CPU actors running the transformers sampling loop."""
    import ray

    from tokdist_ray.raycluster import connect

    source = fitted(source, snippet_len)
    backend = resolve_backend(source.backend)  # before Ray starts: a missing vLLM fails at once
    if not ray.is_initialized():
        connect()
    start = time.perf_counter()
    tokenizer = expansion.tokenizer
    stop = stop_ids(tokenizer, generation_config(model_path))
    indices = list(token_indices) if token_indices is not None else list(range(len(tokens)))
    by_index = dict(zip(indices, tokens))
    wanted = wanted_counts(tokens, snippets_per_token)
    ledger = RoundLedger({i: wanted[t.text] for i, t in by_index.items()}, source.refill_rounds,
                         may_drop=source.min_new_tokens > 0, overgenerate=source.overgenerate)
    stage, workers = generation_stage(backend, model_path, source, snippet_len, stop)
    prefix = bos_prefix(tokenizer)
    with user_errors_from_ray("ray.data"):  # an engine that cannot find the model: its one line, not Ray's traceback
        passes = run_passes(stage, ledger, by_index, prefix, source, workers)

    cuts = ledger.cuts()
    stats = GenerationStats(counts={t.text: 0 for t in tokens}, backend=backend, passes=len(passes))
    stats.samples = sum(bounds[-1] for bounds in cuts.values())
    stats.spare = ledger.samples() - stats.samples
    kept = ledger.kept()
    stats.dropped_short = stats.samples - sum(kept.values())
    snippets = settled(passes, expansion, snippet_len, cuts, token_ranks(by_index, prefix), source.batch_size)
    counts = snippet_counts(snippets) if snippets is not None else Counter()
    for index, token in by_index.items():
        stats.counts[token.text] = counts.get(index, 0)
    stats.dropped_not_emitted = sum(kept.values()) - sum(counts.values())
    stats.seconds = time.perf_counter() - start
    log.info("generation: %d snippets of %d tokens in %d pass(es), %d samples (+%d spare), %d short, "
             "%d without the token (%.1f s)", sum(counts.values()), len(by_index), len(passes), stats.samples,
             stats.spare, stats.dropped_short, stats.dropped_not_emitted, stats.seconds)
    return GeneratedSnippets(snippets, sum(counts.values())), stats


def generate_snippet_table(*args, **kwargs) -> tuple[pa.Table, GenerationStats]:
    """generate_snippets_on_ray (same arguments) with the snippets brought to this process as
    one table (SNIPPET_SCHEMA, in the fixed order): for the API, which holds its snippets anyway."""
    generated, stats = generate_snippets_on_ray(*args, **kwargs)
    return generated.table(), stats
