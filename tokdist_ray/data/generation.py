"""Generated snippets: the model writes contexts that start with each new token's phrase.

One request is one sample: the prompt `[BOS] + phrase ids` (no BOS where the tokenizer has
none), up to `snippet_len` new ids, cut at the first EOS. Samples with fewer than
`min_new_tokens` new ids are dropped and counted; up to `refill_rounds` further rounds
replace them with fresh samples, so a token normally ends with exactly the count asked.

Determinism: each sample has its own seed, derived from (seed, token text, sample index),
and its own random stream, drawn by the exponential race (as vLLM draws). So a sample does
not depend on which other tokens run, on batch size or order, or on the number of actors:
the logits of one prompt differ between batch shapes only by rounding, which flips a draw
only where two ids tie within rounding (not seen in the tests). The same inputs on the
same hardware give bit-identical snippets. vLLM gets the same per-sample seeds and is
reproducible for one vLLM version and GPU type (set VLLM_BATCH_INVARIANT=1 on Hopper and
newer to remove its batch dependence too); its snippets differ from the CPU backend's,
whose kernels differ.

Backends:
  generate_snippets(model, tokenizer, ...)       in-process, on the model the API holds
  generate_snippet_dataset(model_path, ...)      a Ray Data stage: transformers on a CPU
                                                 actor pool, or vLLM via ray.data.llm
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import pyarrow as pa
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.errors import BackendUnavailableError
from tokdist_ray.vocab.models import load_model, load_tokenizer, resolve_model_path
from tokdist_ray.data.snippets import SNIPPET_SCHEMA, MiningStats, bos_prefix
from tokdist_ray.vocab.tokens import NewToken

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("tokdist_ray")
GPU_EXTRA_HINT = "pip install 'tokdist-ray[gpu]' (vLLM and ray[llm]) on the GPU nodes"



@dataclass
class GenerationStats(MiningStats):
    samples: int = 0  # samples drawn, kept or not
    dropped_short: int = 0  # cut at EOS before min_new_tokens
    backend: str = ""

    def as_dict(self, quota: int) -> dict:
        return {
            **super().as_dict(quota),
            "backend": self.backend,
            "samples_generated": self.samples,
            "dropped_short_samples": self.dropped_short,
        }


# --------------------------------------------------------------------------- requests


def sample_seed(seed: int, token: str, sample_index: int) -> int:
    """A stable 63-bit seed per sample (valid for torch and vLLM, and for an arrow int64)."""
    digest = hashlib.blake2b(f"{seed}\x00{token}\x00{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (chat models list several)."""
    ids = set() if tokenizer.eos_token_id is None else {tokenizer.eos_token_id}
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return sorted(ids)


def cut_at_eos(ids: Iterable[int], stop: Sequence[int]) -> list[int]:
    ids = [int(i) for i in ids]
    ends = [ids.index(s) for s in stop if s in ids]
    return ids[: min(ends)] if ends else ids


def plan_requests(
    tokens: Sequence[NewToken],
    missing: dict[str, int],
    first_sample: dict[str, int],
    prefix: list[int],
    seed: int,
    token_indices: Sequence[int],
) -> list[dict]:
    """One request per sample still missing, sorted by prompt length so that batches need
    little padding."""
    requests = [
        {
            "token": token.text,
            "token_index": index,
            "sample_index": k,
            "seed": sample_seed(seed, token.text, k),
            "prompt_ids": prefix + list(token.phrase_ids),
            "phrase_start": len(prefix),
        }
        for token, index in zip(tokens, token_indices)
        for k in range(first_sample[token.text], first_sample[token.text] + missing.get(token.text, 0))
    ]
    return sorted(requests, key=lambda r: (len(r["prompt_ids"]), r["token_index"], r["sample_index"]))


def snippet_from_sample(sample: dict, min_new_tokens: int) -> dict | None:
    """A snippet row (SNIPPET_SCHEMA) from a request plus its `continuation`, or None if too short."""
    if len(sample["continuation"]) < min_new_tokens:
        return None
    return {
        "token": sample["token"],
        "token_index": sample["token_index"],
        "input_ids": [int(i) for i in sample["prompt_ids"]] + list(sample["continuation"]),
        "phrase_start": sample["phrase_start"],
        "source": "generated",
    }


def snippet_table(samples: Iterable[dict], min_new_tokens: int) -> pa.Table:
    rows = [row for s in samples if (row := snippet_from_sample(s, min_new_tokens)) is not None]
    return pa.Table.from_pylist(rows, schema=SNIPPET_SCHEMA)


def wanted_counts(tokens: Sequence[NewToken], snippets_per_token: int | dict[str, int]) -> dict[str, int]:
    if isinstance(snippets_per_token, dict):
        return {t.text: int(snippets_per_token.get(t.text, 0)) for t in tokens}
    return {t.text: int(snippets_per_token) for t in tokens}


def generate_in_rounds(
    tokens: Sequence[NewToken],
    wanted: dict[str, int],
    source: GeneratedDataSource,
    prefix: list[int],
    token_indices: Sequence[int],
    run_round: Callable[[list[dict]], tuple[object, Counter]],
) -> tuple[list, GenerationStats]:
    """Ask for every missing sample, then again for those dropped as too short.
    `run_round(requests) -> (result, kept per token)`; returns the rounds' results."""
    stats = GenerationStats(counts={t.text: 0 for t in tokens})
    next_sample = {t.text: 0 for t in tokens}
    results = []
    for round_no in range(1 + source.refill_rounds):
        missing = {t: n - stats.counts[t] for t, n in wanted.items() if stats.counts[t] < n}
        if not missing:
            break
        requests = plan_requests(tokens, missing, next_sample, prefix, source.seed, token_indices)
        start = time.perf_counter()
        result, kept = run_round(requests)
        results.append(result)
        stats.samples += len(requests)
        for text, n in kept.items():
            stats.counts[text] += n
        for text, n in missing.items():
            next_sample[text] += n
        log.info("generation round %d: %d samples, %d kept (%.1f s)",
                 round_no, len(requests), sum(kept.values()), time.perf_counter() - start)
    stats.dropped_short = stats.samples - sum(stats.counts.values())
    return results, stats


def fitted(source: GeneratedDataSource | None, snippet_len: int) -> GeneratedDataSource:
    """The source with min_new_tokens capped at snippet_len, the most a sample can hold."""
    source = source or GeneratedDataSource()
    return replace(source, min_new_tokens=min(source.min_new_tokens, snippet_len))


# --------------------------------------------------------------------------- sampling


def warp_logits(logits: torch.Tensor, source: GeneratedDataSource) -> torch.Tensor:
    """Temperature, then top-k and top-p, as transformers' sampling applies them."""
    logits = TemperatureLogitsWarper(source.temperature)(None, logits.float())
    if source.top_k:
        logits = TopKLogitsWarper(source.top_k)(None, logits)
    if source.top_p < 1.0:
        logits = TopPLogitsWarper(source.top_p)(None, logits)
    return logits


def draw(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race (Gumbel-max), as vLLM samples: argmax of p / q with q ~ Exp(1)
    draws from p. Unlike an inverse-CDF draw, a tiny change in the logits (another batch
    shape) flips the result only when two ids are within rounding of each other."""
    return torch.softmax(logits, dim=-1).div_(noise.to(logits.device)).argmax(dim=-1)


class SampleStreams:
    """One random stream per sample, so that a sample's draws depend on its seed alone."""

    def __init__(self, seeds: Iterable[int]) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def noise(self, vocab_size: int) -> torch.Tensor:
        q = torch.empty(len(self.generators), vocab_size)
        for row, generator in zip(q, self.generators):
            row.exponential_(generator=generator)
        return q


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def cache_argument(model) -> str:
    """transformers 5.24 renamed the KV cache argument and output from `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def sample_continuations(
    model, requests: Sequence[dict], source: GeneratedDataSource, max_new_tokens: int, stop: Sequence[int], pad_id: int
) -> list[list[int]]:
    """Decode one batch of prompts (left padded, KV cached) with plain seeded sampling; each
    continuation is cut at its first EOS. A sampling loop of our own rather than `generate`,
    so that no sampling default from the model's generation_config can leak in."""
    device = next(model.parameters()).device
    input_ids, mask = left_pad([r["prompt_ids"] for r in requests], pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    streams = SampleStreams(r["seed"] for r in requests)
    stop_t = torch.tensor(list(stop), dtype=torch.long, device=device)
    cache_name, cache = cache_argument(model), None
    finished = torch.zeros(len(requests), dtype=torch.bool, device=device)
    steps = []
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{cache_name: cache})
        cache = out[cache_name]
        logits = warp_logits(out.logits[:, -1], source)
        next_ids = draw(logits, streams.noise(logits.shape[-1]))
        steps.append(next_ids)
        finished |= torch.isin(next_ids, stop_t)
        if finished.all():
            break
        input_ids = next_ids[:, None]
        mask = torch.cat([mask, mask.new_ones(len(requests), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return [cut_at_eos(row, stop) for row in torch.stack(steps, dim=1).tolist()]


def padding_id(tokenizer, stop: Sequence[int]) -> int:
    """Any id works under the attention mask; prefer the tokenizer's pad."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stop[0] if stop else 0


def batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --------------------------------------------------------------------------- in-process


def generate_snippets(
    model,
    tokenizer,
    tokens: Sequence[NewToken],
    snippet_len: int = 50,
    snippets_per_token: int | dict[str, int] = 100,
    source: GeneratedDataSource | None = None,
    token_indices: Sequence[int] | None = None,
) -> tuple[list[dict], GenerationStats]:
    """Snippet rows (SNIPPET_SCHEMA, source="generated") written by `model`, in-process.

    `snippets_per_token` may be a dict token -> count (a top-up of a shortfall).
    `token_indices` gives each token's index in the run (defaults to its position).
    `backend="vllm"` hands the work to the Ray Data stage, for the model's own directory;
    "auto" and "transformers" sample here, on the model as it is (device, dtype).
    """
    source = fitted(source, snippet_len)
    if source.backend == "vllm":
        return _collected(generate_snippet_dataset(
            model.name_or_path, tokens, snippet_len, snippets_per_token, source, token_indices, tokenizer))
    start = time.perf_counter()
    stop = stop_ids(tokenizer, getattr(model, "generation_config", None))
    pad = padding_id(tokenizer, stop)

    def run_round(requests: list[dict]) -> tuple[list[dict], Counter]:
        rows = []
        for batch in batches(requests, source.batch_size):
            continuations = sample_continuations(model, batch, source, snippet_len, stop, pad)
            samples = ({**r, "continuation": c} for r, c in zip(batch, continuations))
            rows += [row for s in samples if (row := snippet_from_sample(s, source.min_new_tokens)) is not None]
        return rows, Counter(r["token"] for r in rows)

    indices = list(token_indices) if token_indices is not None else list(range(len(tokens)))
    results, stats = generate_in_rounds(
        tokens, wanted_counts(tokens, snippets_per_token), source, bos_prefix(tokenizer), indices, run_round)
    rows = sorted((row for rows in results for row in rows), key=lambda r: r["token_index"])
    stats.backend, stats.seconds = "transformers-in-process", time.perf_counter() - start
    return rows, stats


def _collected(result: tuple["ray.data.Dataset", GenerationStats]) -> tuple[list[dict], GenerationStats]:
    dataset, stats = result
    rows = sorted(dataset.take_all(), key=lambda r: r["token_index"])
    for row in rows:
        row["input_ids"] = [int(i) for i in row["input_ids"]]
    return rows, stats


# --------------------------------------------------------------------------- Ray Data


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
        return snippet_table(({**r, "continuation": c} for r, c in zip(requests, continuations)), self.source.min_new_tokens)


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


def generate_snippet_dataset(
    model_path: str,
    tokens: Sequence[NewToken],
    snippet_len: int = 50,
    snippets_per_token: int | dict[str, int] = 100,
    source: GeneratedDataSource | None = None,
    token_indices: Sequence[int] | None = None,
    tokenizer=None,
) -> tuple["ray.data.Dataset", GenerationStats]:
    """Generated snippets as a materialised Ray Dataset in SNIPPET_SCHEMA (write it with
    `write_parquet`), plus per-token counts. Order is deterministic: by round, then by
    prompt length, token and sample.

    The backend follows `source.backend`: vLLM replicas (`concurrency` of them, each on
    `tensor_parallel_size` GPUs) through ray.data.llm, or a pool of `concurrency` CPU actors
    running the transformers sampling loop.
    """
    import ray.data

    source = fitted(source, snippet_len)
    backend = resolve_backend(source.backend)
    start = time.perf_counter()
    model_dir = resolve_model_path(model_path)
    tokenizer = tokenizer or load_tokenizer(model_path)
    stop = stop_ids(tokenizer, model_generation_config(model_dir))
    if backend == "vllm":
        from tokdist_ray.data.vllm_generation import vllm_stage

        stage = vllm_stage(model_dir, source, snippet_len, stop)
    else:  # actors resolve the name themselves, so a bundled model materialises on each node
        stage = transformers_stage(model_path, source, snippet_len, stop)

    def run_round(requests: list[dict]) -> tuple["ray.data.Dataset", Counter]:
        dataset = stage(ray.data.from_items(requests, override_num_blocks=request_blocks(len(requests), source)))
        dataset.context.execution_options.preserve_order = True
        dataset = dataset.materialize()
        return dataset, token_counts(dataset)

    indices = list(token_indices) if token_indices is not None else list(range(len(tokens)))
    results, stats = generate_in_rounds(
        tokens, wanted_counts(tokens, snippets_per_token), source, bos_prefix(tokenizer), indices, run_round)
    if not results:  # nothing was asked for
        return ray.data.from_arrow(SNIPPET_SCHEMA.empty_table()), stats
    dataset = results[0].union(*results[1:]) if len(results) > 1 else results[0]
    stats.backend, stats.seconds = backend, time.perf_counter() - start
    return dataset, stats
