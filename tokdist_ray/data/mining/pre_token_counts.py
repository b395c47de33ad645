"""Pre-token counts of a corpus, what continued BPE training (vocab.bpe_training) runs on.

On Ray Data when this process is connected to Ray: each task counts a block of documents
with the shipped tokenizer (built once per worker process) and returns an Arrow table of
(pre_token, count), far smaller than the text; the driver sums them. Otherwise the
documents are counted in this process.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from typing import Iterable, Iterator

import pyarrow as pa

from tokdist_ray.config import FileDataSource, HFDataSource
from tokdist_ray.data.corpus.corpus import documents
from tokdist_ray.data.corpus.corpus_parts import TEXT
from tokdist_ray.data.corpus.ray_corpus import MINER_CPUS, corpus_dataset
from tokdist_ray.data.corpus.sources import corpus_reader
from tokdist_ray.data.mining.miner import TokenizerSpec
from tokdist_ray.errors import user_errors_from_ray
from tokdist_ray.raycluster import ray_is_running
from tokdist_ray.vocab.bpe_training import pre_token_counts

PRE_TOKEN = "pre_token"
COUNT = "count"


@lru_cache(maxsize=1)
def _tokenizer(definition: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(definition)


def _texts(values: Iterable) -> Iterator[str]:
    """The documents worth counting: strings with more than whitespace (null rows and
    empty texts are skipped, as the miners skip them)."""
    return (v for v in values if isinstance(v, str) and v.strip())


def _count_block(batch: pa.Table, definition: str) -> pa.Table:
    counts = pre_token_counts(_tokenizer(definition), _texts(batch[TEXT].to_pylist()))
    return pa.table({PRE_TOKEN: pa.array(list(counts), pa.string()), COUNT: pa.array(list(counts.values()), pa.int64())})


def count_pre_tokens(
    source: FileDataSource | HFDataSource, tokenizer, seed: int = 0, num_workers: int | None = None
) -> Counter[str]:
    """Pre-token counts (vocabulary strings, "Ġiterable") of the corpus `source`, read in
    the seeded order of ray_corpus (which only matters with `max_docs`). `tokenizer`: a
    TokenizerSpec, a fast HF tokenizer or a model path/id. `num_workers` caps the
    counting tasks running at once (default: one per CPU of the cluster)."""
    spec = tokenizer if isinstance(tokenizer, TokenizerSpec) else TokenizerSpec.of(tokenizer)
    if not ray_is_running():
        return pre_token_counts(spec.load(), _texts(documents(source)))

    import ray.data

    dataset = corpus_dataset(corpus_reader(source), seed).map_batches(
        _count_block,
        fn_kwargs={"definition": spec.definition},
        batch_size=None,  # whole blocks: local reads then fuse into the counting tasks
        batch_format="pyarrow",
        num_cpus=MINER_CPUS,
        compute=ray.data.TaskPoolStrategy(size=num_workers) if num_workers else None,
    )
    dataset.context.enable_progress_bars = False
    counts: Counter[str] = Counter()
    with user_errors_from_ray("ray.data"):  # a corpus file that cannot be read: its CorpusFileError, not Ray's
        for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for pre_token, count in zip(block[PRE_TOKEN].to_pylist(), block[COUNT].to_pylist()):
                counts[pre_token] += count
    return counts
