"""The transformers backend of snippet generation: requests in, samples out, on a Ray Data
pool of CPU actors, each running the CPU sampling loop (sampling.py) on its own copy of the
model. The per-sample seeds make its samples independent of batching, actors and passes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.data.generation.model_source import engine_model_path
from tokdist_ray.data.generation.requests import raw_sample, raw_table

if TYPE_CHECKING:
    import ray.data


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
