"""Generation as Ray Data stages: transformers on a CPU actor pool, or vLLM replicas through
ray.data.llm (vllm_backend). The driver plans and counts; every sample stays in Ray Data.

    token ranges (driver) -> requests -> engines -> samples (object store, per pass)
        -> the round ledger settles which samples each token keeps (driver: short flags only)
        -> settled snippets (expanded tokenizer, in Ray Data) -> sorted, written as parquet parts

Per pass the driver sees the (token index, sample index) of each short sample, and after
settling one int per snippet (its token index, for the counts): no sample's ids. The
snippets come out in a fixed order whatever the passes, actors or blocks: by round, then by
(prompt length, token index) and sample index, the order in which the in-process API
(local.py) produces them, so the API and the job give the same table.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pyarrow as pa

from tokdist_ray.capacity import Capacity, cluster_capacity, wait_for_nodes
from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.data.generation.model_source import engine_model_path, generation_config
from tokdist_ray.data.generation.requests import (
    GPU_EXTRA_HINT,
    GenerationStats,
    fitted,
    raw_sample,
    raw_table,
    sample_seed,
    settled_snippets,
    stop_ids,
    wanted_counts,
)
from tokdist_ray.data.generation.rounds import RoundLedger, round_of
from tokdist_ray.data.snippets import SNIPPET_SCHEMA, bos_prefix
from tokdist_ray.errors import BackendUnavailableError, TokdistError
from tokdist_ray.storage import location
from tokdist_ray.vocab.tokens import NewToken

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("tokdist_ray")

ORDER = ["round", "rank", "sample_index"]  # the snippets' order; rank: the token's (prompt length, index) place
ORDER_SCHEMA = pa.schema([("round", pa.int32()), ("rank", pa.int32()), ("sample_index", pa.int32())])


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cluster_has_gpus() -> bool:
    """Whether the cluster has GPU nodes or its autoscaler can launch them (an autoscaling
    cluster starts with none up); without Ray, whether this machine has a GPU."""
    import ray

    if ray.is_initialized():
        return cluster_capacity().gpu_replicas() > 0
    import torch

    return torch.cuda.is_available()


def resolve_backend(requested: str) -> str:
    """"vllm" or "transformers" for a Ray Data run; explains how to get vLLM when it is missing."""
    if requested == "transformers":
        return "transformers"
    if requested == "vllm":
        if not vllm_installed():
            raise BackendUnavailableError(
                f"backend='vllm' needs vLLM, which is not installed here: {GPU_EXTRA_HINT}; "
                "or use backend='transformers' (CPU actors) or 'auto'"
            )
        return "vllm"
    return "vllm" if vllm_installed() and cluster_has_gpus() else "transformers"


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


# ------------------------------------------------------------------ the CPU backend
class TransformersSampler:
    """A Ray Data actor: loads the model once (resolved on its own node), turns batches of
    requests into RAW_SAMPLE_SCHEMA rows."""

    def __init__(self, model_path: str, source: GeneratedDataSource, snippet_len: int, stop: list[int]) -> None:
        import torch

        from tokdist_ray.data.generation.sampling import padding_id
        from tokdist_ray.vocab.models import load_model, load_tokenizer

        torch.set_num_threads(max(1, int(source.num_cpus_per_actor)))
        model_dir = engine_model_path(model_path)
        self.model = load_model(model_dir, dtype=source.dtype)
        self.pad = padding_id(load_tokenizer(model_dir), stop)
        self.source, self.snippet_len, self.stop = source, snippet_len, stop

    def __call__(self, batch: pa.Table) -> pa.Table:
        from tokdist_ray.data.generation.sampling import sample_continuations

        requests = batch.to_pylist()
        continuations = sample_continuations(self.model, requests, self.source, self.snippet_len, self.stop, self.pad)
        return raw_table([raw_sample(r, c, self.source.min_new_tokens) for r, c in zip(requests, continuations)])


def transformers_stage(model_path: str, source: GeneratedDataSource, snippet_len: int, stop: list[int], actors: int):
    import ray.data

    def apply(requests: "ray.data.Dataset") -> "ray.data.Dataset":
        return requests.map_batches(
            TransformersSampler,
            fn_constructor_kwargs={"model_path": model_path, "source": source, "snippet_len": snippet_len, "stop": stop},
            batch_size=source.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=source.num_cpus_per_actor,
        )

    return apply


# ------------------------------------------------------------------ settling and the result
class SnippetSettler:
    """A Ray Data actor: the expanded tokenizer, built once; samples a token keeps (by the
    round ledger's cuts) become snippets with their order keys, the others are left out."""

    def __init__(self, tokenizer, new_start: int, snippet_len: int, cuts: dict[int, list[int]],
                 ranks: dict[int, int]) -> None:
        self.tokenizer, self.new_start, self.snippet_len = tokenizer, new_start, snippet_len
        self.cuts, self.ranks = cuts, ranks

    def __call__(self, batch: pa.Table) -> pa.Table:
        index, sample = batch["token_index"].to_pylist(), batch["sample_index"].to_pylist()
        short = batch["short"].to_pylist()
        keep = [row for row, (i, s, cut_short) in enumerate(zip(index, sample, short))
                if not cut_short and i in self.cuts and s < self.cuts[i][-1]]
        kept = batch.take(pa.array(keep, pa.int64()))
        ks, ki = kept["sample_index"].to_pylist(), kept["token_index"].to_pylist()
        keys = pa.table({"round": pa.array([round_of(self.cuts[i], s) for i, s in zip(ki, ks)], pa.int32()),
                         "rank": pa.array([self.ranks[i] for i in ki], pa.int32())})
        samples = kept.select(["token", "token_index", "input_ids", "phrase_start", "sample_index"])
        samples = samples.append_column("round", keys["round"]).append_column("rank", keys["rank"])
        return settled_snippets(samples, self.tokenizer, self.new_start, self.snippet_len).select(SNIPPET_SCHEMA.names + ORDER)


def write_part(batch: pa.Table, directory: str) -> pa.Table:
    """One parquet part of sorted snippets, named by its first order key, so that the
    parts' sorted paths (the order training reads them in) are the snippets' order."""
    import pyarrow.parquet as pq

    if batch.num_rows == 0:
        return pa.table({"path": pa.array([], pa.string()), "rows": pa.array([], pa.int64()),
                         "first": pa.array([], pa.string()), "last": pa.array([], pa.string())})
    batch = batch.sort_by([(k, "ascending") for k in ORDER])
    first, last = (order_key(batch.slice(i, 1).select(ORDER).to_pylist()[0]) for i in (0, batch.num_rows - 1))
    fs, root = location(directory)
    path = f"{root.rstrip('/')}/part-{first}.parquet"
    pq.write_table(batch.select(SNIPPET_SCHEMA.names).cast(SNIPPET_SCHEMA), path, filesystem=fs)
    return pa.table({"path": [path], "rows": [batch.num_rows], "first": [first], "last": [last]})


def order_key(row: dict) -> str:
    return f"r{row['round']:03d}-t{row['rank']:09d}-s{row['sample_index']:09d}"


@dataclass
class GeneratedSnippets:
    """Generated snippets left in Ray's object store (SNIPPET_SCHEMA columns plus the order
    keys): `write` puts them into parquet parts from the workers, `table` brings them to
    this process (the API, tests); both in the fixed order."""

    dataset: "ray.data.Dataset | None"  # None: nothing was generated
    num_rows: int

    def write(self, directory: str) -> list[str]:
        """Parquet parts under `directory` (made if missing), written by Ray Data; their
        sorted paths hold the snippets in order. Returns the paths, in that order."""
        fs, root = location(directory)
        fs.create_dir(root, recursive=True)
        if self.num_rows == 0:
            return []
        parts = self.dataset.sort(ORDER).map_batches(partial(write_part, directory=directory), batch_size=None,
                                                     batch_format="pyarrow").materialize()
        files = sorted((row for row in parts.iter_rows()), key=lambda row: row["first"])
        for before, after in zip(files, files[1:]):
            if before["last"] >= after["first"]:  # Ray Data handed one call two sort ranges: the order would break
                raise TokdistError(f"generated snippet parts overlap ({before['path']}, {after['path']}); "
                                   "this is a bug, please report it")
        if sum(row["rows"] for row in files) != self.num_rows:
            raise TokdistError(f"wrote {sum(row['rows'] for row in files)} generated snippets, expected {self.num_rows}")
        return [row["path"] for row in files]

    def table(self) -> pa.Table:
        import ray

        tables = [t for t in ray.get(self.dataset.to_arrow_refs()) if t.num_rows] if self.dataset is not None else []
        if not tables:
            return SNIPPET_SCHEMA.empty_table()
        table = pa.concat_tables(tables).sort_by([(k, "ascending") for k in ORDER])
        return table.select(SNIPPET_SCHEMA.names).cast(SNIPPET_SCHEMA)


# ------------------------------------------------------------------ the whole stage
def token_ranks(tokens: dict[int, NewToken], prefix: list[int]) -> dict[int, int]:
    """Each token's place by (prompt length, token index): the order within a round."""
    order = sorted(tokens, key=lambda i: (len(prefix) + len(tokens[i].phrase_ids), i))
    return {index: rank for rank, index in enumerate(order)}


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


def replica_bundle(source: GeneratedDataSource) -> dict[str, float]:
    """What one vLLM replica needs of one node: its GPUs, of `accelerator_type` if set."""
    pinned = {f"accelerator_type:{source.accelerator_type}": 0.001} if source.accelerator_type else {}
    return {"GPU": source.tensor_parallel_size, **pinned}


def vllm_replicas(source: GeneratedDataSource, capacity: Capacity) -> int:
    """`source.concurrency`, or as many replicas as the cluster's GPU nodes hold once its
    autoscaler has launched all it can: per node, its GPUs (of `accelerator_type`, if set)
    divided by `tensor_parallel_size`; at least 1."""
    if source.concurrency is not None:
        return int(source.concurrency)
    replicas = max(1, capacity.gpu_replicas(source.tensor_parallel_size, source.accelerator_type))
    log.info("vLLM: %d engine replica(s) of %d GPU(s) each (generation.concurrency sets another number)",
             replicas, source.tensor_parallel_size)
    return replicas


def settled(passes: list, expansion, snippet_len: int, cuts: dict[int, list[int]], ranks: dict[int, int],
            batch_size: int) -> "ray.data.Dataset | None":
    """The passes' samples the tokens keep, as snippets with their order keys (materialised)."""
    import ray.data

    if not passes:
        return None
    samples = passes[0].union(*passes[1:]) if len(passes) > 1 else passes[0]
    return samples.map_batches(
        SnippetSettler, batch_format="pyarrow", batch_size=max(batch_size, 256),
        fn_constructor_kwargs={"tokenizer": expansion.tokenizer, "new_start": expansion.new_start,
                               "snippet_len": snippet_len, "cuts": cuts, "ranks": ranks},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cluster_capacity().cpu_workers(1)),
    ).materialize()


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
