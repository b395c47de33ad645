"""Generation requests and rounds, shared by every backend: one request per sample with
its own seed, samples cut at EOS, too-short samples dropped and replaced in later rounds.
The transformers backend draws each sample from its seed; vLLM engines draw every request
from one seed per engine start instead, and leave the requests' seeds unread
(vllm_backend: why, and what stays reproducible)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import pyarrow as pa

from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.data.budget import Quota
from tokdist_ray.data.snippets import SNIPPET_SCHEMA, MiningStats, bos_prefix, settle, window_around
from tokdist_ray.vocab.tokens import NewToken

log = logging.getLogger("tokdist_ray")
GPU_EXTRA_HINT = "pip install 'tokdist-ray[gpu]' (vLLM and ray[llm]) on the GPU nodes"

# A sample as the model wrote it, in original ids: [BOS] + phrase + continuation.
# expanded_snippets turns samples into snippets (SNIPPET_SCHEMA).
SAMPLE_SCHEMA = pa.schema(
    [
        ("token", pa.string()),
        ("token_index", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("phrase_start", pa.int32()),
        ("source", pa.string()),
    ]
)
# What an engine or actor returns per request, on the Ray backends (the CPU actors of
# transformers_backend, the vLLM engines of vllm_backend): short samples (cut at EOS before
# min_new_tokens) keep no ids, only their flag, which the round ledger needs.
RAW_SAMPLE_SCHEMA = pa.schema([
    ("token", pa.string()),
    ("token_index", pa.int32()),
    ("sample_index", pa.int32()),
    ("phrase_start", pa.int32()),
    ("input_ids", pa.list_(pa.int32())),  # [BOS] + phrase + continuation, original ids
    ("short", pa.bool_()),
])


@dataclass
class GenerationStats(MiningStats):
    samples: int = 0  # samples drawn, kept or not
    dropped_short: int = 0  # cut at EOS before min_new_tokens
    dropped_not_emitted: int = 0  # the expanded tokenizer does not emit the token in the sample
    spare: int = 0  # samples generated beyond the rounds' (rounds.RoundLedger's spares), never kept
    passes: int = 0  # starts of the engines or actors (Ray backends)
    backend: str = ""

    def as_dict(self, quota: Quota) -> dict:
        return {
            **super().as_dict(quota),
            "backend": self.backend,
            "samples_generated": self.samples,
            "dropped_short_samples": self.dropped_short,
            "dropped_samples_without_the_token": self.dropped_not_emitted,
            "spare_samples_generated": self.spare,
            "engine_passes": self.passes,
        }


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


def sample_row(sample: dict, min_new_tokens: int) -> dict | None:
    """A sample (SAMPLE_SCHEMA row) from a request plus its `continuation`, or None if too short."""
    if len(sample["continuation"]) < min_new_tokens:
        return None
    return {
        "token": sample["token"],
        "token_index": sample["token_index"],
        "input_ids": [int(i) for i in sample["prompt_ids"]] + list(sample["continuation"]),
        "phrase_start": sample["phrase_start"],
        "source": "generated",
    }


def sample_table(samples: Iterable[dict], min_new_tokens: int) -> pa.Table:
    rows = [row for s in samples if (row := sample_row(s, min_new_tokens)) is not None]
    return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


def raw_sample(request: dict, continuation: Sequence[int], min_new_tokens: int) -> dict:
    """A request and its continuation as a RAW_SAMPLE_SCHEMA row."""
    short = len(continuation) < min_new_tokens
    return {"token": request["token"], "token_index": int(request["token_index"]),
            "sample_index": int(request["sample_index"]), "phrase_start": int(request["phrase_start"]),
            "input_ids": [] if short else [int(i) for i in request["prompt_ids"]] + [int(i) for i in continuation],
            "short": short}


def raw_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RAW_SAMPLE_SCHEMA)


def settled_snippets(samples: pa.Table, tokenizer, new_start: int, snippet_len: int) -> pa.Table:
    """Samples (SAMPLE_SCHEMA columns, any others carried along) as snippets: the sample's
    text encoded by the expanded tokenizer, the rule every snippet follows, in SNIPPET_SCHEMA
    columns plus the carried ones. A sample in which that tokenizer does not emit the token
    (the model glued more letters on to the word, and BPE splits the longer word otherwise)
    is left out. Columnar in and out: one batch of Python lists at a time, so that it runs
    per batch inside Ray Data as well as on the API's samples."""
    ids, starts = samples["input_ids"].to_pylist(), samples["phrase_start"].to_pylist()
    texts = tokenizer.batch_decode([list(i[s:]) for i, s in zip(ids, starts)])
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    keep, snippet_ids, positions = [], [], []
    for row, (sample, start, index, enc) in enumerate(zip(ids, starts, samples["token_index"].to_pylist(), encoded)):
        new_id = new_start + index
        settled = new_id in enc and settle(tokenizer.backend_tokenizer, *window_around(enc, enc.index(new_id), 1, snippet_len))
        if settled:
            window, offset = settled
            keep.append(row)
            snippet_ids.append(list(sample[:start]) + window)
            positions.append(start + offset)
    kept = samples.take(pa.array(keep, pa.int64()))
    carried = [name for name in kept.column_names if name not in SNIPPET_SCHEMA.names and name != "phrase_start"]
    columns = {"token": kept["token"], "token_index": kept["token_index"],
               "input_ids": pa.array(snippet_ids, pa.list_(pa.int32())), "token_position": pa.array(positions, pa.int32()),
               "source": kept["source"] if "source" in kept.column_names else pa.repeat("generated", len(keep))}
    table = pa.table(columns).cast(SNIPPET_SCHEMA)
    for name in carried:
        table = table.append_column(name, kept[name])
    return table


def expanded_snippets(samples: Sequence[dict], expansion, snippet_len: int, stats: GenerationStats) -> pa.Table:
    """settled_snippets on sample rows (SAMPLE_SCHEMA dicts) held in this process; the
    samples left out are counted in `stats`."""
    table = settled_snippets(pa.Table.from_pylist(list(samples), schema=SAMPLE_SCHEMA), expansion.tokenizer,
                             expansion.new_start, snippet_len)
    kept = Counter(table["token"].to_pylist())
    for token, n in Counter(s["token"] for s in samples).items():
        stats.dropped_not_emitted += n - kept[token]
        stats.counts[token] -= n - kept[token]
    return table


def wanted_counts(tokens: Sequence[NewToken], snippets_per_token: int | dict[str, int]) -> dict[str, int]:
    if isinstance(snippets_per_token, dict):
        return {t.text: int(snippets_per_token.get(t.text, 0)) for t in tokens}
    return {t.text: int(snippets_per_token) for t in tokens}


def generate_in_rounds(
    expansion,
    tokens: Sequence[NewToken],
    snippet_len: int,
    snippets_per_token: int | dict[str, int],
    source: GeneratedDataSource,
    token_indices: Sequence[int] | None,
    run_round: Callable[[list[dict]], tuple[object, Counter]],
    samples_of: Callable[[list], Iterable[dict]],
) -> tuple[pa.Table, GenerationStats]:
    """Every backend's generation: ask for every missing sample, then again for those
    dropped as too short, and turn the samples into snippets (expanded_snippets), in
    request order. `run_round(requests) -> (result, kept per token)`; `samples_of(results)`
    gives the rounds' samples. `token_indices`: each token's place in the run (default
    0, 1, ...); `snippets_per_token` may be a dict token -> count (a top-up)."""
    wanted = wanted_counts(tokens, snippets_per_token)
    indices = list(token_indices) if token_indices is not None else list(range(len(tokens)))
    prefix = bos_prefix(expansion.tokenizer)
    stats = GenerationStats(counts={t.text: 0 for t in tokens})
    next_sample = {t.text: 0 for t in tokens}
    results = []
    for round_no in range(1 + source.refill_rounds):
        missing = {t: n - stats.counts[t] for t, n in wanted.items() if stats.counts[t] < n}
        if not missing:
            break
        requests = plan_requests(tokens, missing, next_sample, prefix, source.seed, indices)
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
    return expanded_snippets(list(samples_of(results)), expansion, snippet_len, stats), stats


def fitted(source: GeneratedDataSource | None, snippet_len: int) -> GeneratedDataSource:
    """The source with min_new_tokens capped at snippet_len, the most a sample can hold."""
    source = source or GeneratedDataSource()
    return replace(source, min_new_tokens=min(source.min_new_tokens, snippet_len))


