"""Generation as a Ray Data stage: transformers on a CPU actor pool, or vLLM replicas
through ray.data.llm (vllm_backend)."""

from __future__ import annotations

import importlib.util
import math
import time
from collections import Counter
from typing import TYPE_CHECKING, Sequence

import pyarrow as pa
import torch

from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.data.generation.requests import (
    GPU_EXTRA_HINT,
    GenerationStats,
    fitted,
    generate_in_rounds,
    sample_table,
    stop_ids,
)
from tokdist_ray.data.generation.sampling import padding_id, sample_continuations
from tokdist_ray.errors import BackendUnavailableError
from tokdist_ray.vocab.models import load_model, load_tokenizer, resolve_model_path
from tokdist_ray.vocab.tokens import NewToken

if TYPE_CHECKING:
    import ray.data


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cluster_has_gpus() -> bool:
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
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


class TransformersSampler:
    """A Ray Data actor: loads the model once, turns batches of requests into snippet rows."""

    def __init__(self, model_path: str, source: GeneratedDataSource, snippet_len: int, stop: list[int]) -> None:
        torch.set_num_threads(max(1, int(source.num_cpus_per_actor)))
        self.model = load_model(model_path, dtype=source.dtype)
        self.pad = padding_id(load_tokenizer(model_path), stop)
        self.source, self.snippet_len, self.stop = source, snippet_len, stop

    def __call__(self, batch: pa.Table) -> pa.Table:
        requests = batch.to_pylist()
        continuations = sample_continuations(self.model, requests, self.source, self.snippet_len, self.stop, self.pad)
        return sample_table(({**r, "continuation": c} for r, c in zip(requests, continuations)), self.source.min_new_tokens)


def transformers_stage(model_path: str, source: GeneratedDataSource, snippet_len: int, stop: list[int]):
    import ray.data

    def apply(requests: "ray.data.Dataset") -> "ray.data.Dataset":
        return requests.map_batches(
            TransformersSampler,
            fn_constructor_kwargs={"model_path": model_path, "source": source, "snippet_len": snippet_len, "stop": stop},
            batch_size=source.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=source.concurrency),
            num_cpus=source.num_cpus_per_actor,
        )

    return apply


def model_generation_config(model_dir: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the tokenizer's EOS is all there is
        return None


def token_counts(dataset: "ray.data.Dataset") -> Counter:
    counts: Counter = Counter()
    for batch in dataset.select_columns(["token"]).iter_batches(batch_format="pyarrow"):
        counts.update(batch["token"].to_pylist())
    return counts


def request_blocks(n_requests: int, source: GeneratedDataSource) -> int:
    """One block per batch, and at least one per actor or replica so that none idles."""
    return max(math.ceil(n_requests / source.batch_size), min(n_requests, source.concurrency))


def generate_snippet_table(
    model_path: str,
    expansion,
    tokens: Sequence[NewToken],
    snippet_len: int = 50,
    snippets_per_token: int | dict[str, int] = 100,
    source: GeneratedDataSource | None = None,
    token_indices: Sequence[int] | None = None,
) -> tuple[pa.Table, GenerationStats]:
    """Generated snippets of `tokens` (some of `expansion.tokens`; `token_indices` are
    their places there, by default 0, 1, ...) as a table in SNIPPET_SCHEMA, plus per-token
    counts. Order is deterministic: by round, then by prompt length, token and sample.

    The backend follows `source.backend`: vLLM replicas (`concurrency` of them, each on
    `tensor_parallel_size` GPUs) through ray.data.llm, or a pool of `concurrency` CPU actors
    running the transformers sampling loop.
    """
    import ray.data

    source = fitted(source, snippet_len)
    backend = resolve_backend(source.backend)
    start = time.perf_counter()
    model_dir = resolve_model_path(model_path)
    tokenizer = expansion.tokenizer
    stop = stop_ids(tokenizer, model_generation_config(model_dir))
    if backend == "vllm":
        from tokdist_ray.data.generation.vllm_backend import vllm_stage

        stage = vllm_stage(model_dir, source, snippet_len, stop)
    else:  # actors resolve the name themselves, so a bundled model materialises on each node
        stage = transformers_stage(model_path, source, snippet_len, stop)

    def run_round(requests: list[dict]) -> tuple["ray.data.Dataset", Counter]:
        dataset = stage(ray.data.from_items(requests, override_num_blocks=request_blocks(len(requests), source)))
        dataset.context.execution_options.preserve_order = True
        dataset = dataset.materialize()
        return dataset, token_counts(dataset)

    table, stats = generate_in_rounds(expansion, tokens, snippet_len, snippets_per_token, source, token_indices,
                                      run_round, samples_of=lambda rounds: (row for ds in rounds for row in ds.take_all()))
    stats.backend, stats.seconds = backend, time.perf_counter() - start
    return table, stats
