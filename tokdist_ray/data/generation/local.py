"""In-process generation on the model the API holds."""

from __future__ import annotations

import time
from collections import Counter
from typing import Sequence

from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.data.generation.requests import (
    GenerationStats,
    fitted,
    generate_in_rounds,
    sample_row,
    stop_ids,
)
from tokdist_ray.data.generation.sampling import batches, padding_id, sample_continuations
from tokdist_ray.vocab.tokens import NewToken


def generate_snippets(model, expansion, tokens: Sequence[NewToken], snippet_len: int = 50,
                      snippets_per_token: int | dict[str, int] = 100, source: GeneratedDataSource | None = None,
                      token_indices: Sequence[int] | None = None,
                      model_path: str | None = None) -> tuple[list[dict], GenerationStats]:
    """ray_backend.generate_snippet_table's arguments, but on `model` in this process,
    returning snippet rows (SNIPPET_SCHEMA, source="generated", in the expanded
    tokenizer's ids), in the Ray backend's order (by round, prompt length, token, sample).
    `backend="vllm"` hands the work to the Ray Data stage, for `model_path` (the name the
    model was loaded by, which the GPU nodes resolve themselves; default the model's own
    directory); "auto" and "transformers" sample here, on the model as it is (device, dtype).
    """
    source = fitted(source, snippet_len)
    if source.backend == "vllm":
        from tokdist_ray.data.generation.ray_backend import generate_snippet_table

        table, stats = generate_snippet_table(
            model_path or model.name_or_path, expansion, tokens, snippet_len, snippets_per_token, source, token_indices)
        return table.to_pylist(), stats
    tokenizer = expansion.tokenizer
    start = time.perf_counter()
    stop = stop_ids(tokenizer, getattr(model, "generation_config", None))
    pad = padding_id(tokenizer, stop)

    def run_round(requests: list[dict]) -> tuple[list[dict], Counter]:
        rows = []
        for batch in batches(requests, source.batch_size):
            continuations = sample_continuations(model, batch, source, snippet_len, stop, pad)
            samples = ({**r, "continuation": c} for r, c in zip(batch, continuations))
            rows += [row for s in samples if (row := sample_row(s, source.min_new_tokens)) is not None]
        return rows, Counter(r["token"] for r in rows)

    table, stats = generate_in_rounds(expansion, tokens, snippet_len, snippets_per_token, source, token_indices,
                                      run_round, samples_of=lambda rounds: (row for rows in rounds for row in rows))
    stats.backend, stats.seconds = "transformers-in-process", time.perf_counter() - start
    return table.to_pylist(), stats
