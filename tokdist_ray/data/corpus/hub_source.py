"""An HFDataSource read: a Hugging Face dataset streamed, opened the same way in this
process and in Ray Data's read tasks (one per shard of the IterableDataset, in the seeded
order, `map_to_text_fn` applied in the read task)."""

from __future__ import annotations

import hashlib
import logging
import marshal
import random
from dataclasses import asdict
from functools import partial
from itertools import islice
from typing import Any, Iterable, Iterator

import pyarrow as pa

from tokdist_ray.config import HFDataSource
from tokdist_ray.data.corpus.corpus_parts import text_blocks
from tokdist_ray.data.corpus.files import BadRow, row_text
from tokdist_ray.data.corpus.ray_corpus import numbered
from tokdist_ray.data.corpus.source import CorpusReader, Read

log = logging.getLogger("tokdist_ray")
TEXT_FILE_BUILDERS = ("text", "json", "csv")  # datasets' builders that decode local files themselves


def open_stream(source: HFDataSource, warn: bool = False):
    """The dataset split as a streaming IterableDataset; `warn` once per run, where the
    driver opens it, about settings that no longer apply."""
    import datasets

    if warn and source.trust_remote_code:
        log.warning("trust_remote_code is ignored: datasets no longer runs dataset scripts")
    kwargs = {"name": source.name, "split": source.split, "streaming": True, "revision": source.revision}
    if source.data_files is not None:
        kwargs["data_files"] = source.data_files
    if source.dataset_path in TEXT_FILE_BUILDERS:  # bytes that are not UTF-8 are replaced, as in FileDataSource
        kwargs["encoding_errors"] = "replace"
    return datasets.load_dataset(source.dataset_path, **kwargs)


def stream_values(rows: Iterable[Any], source: HFDataSource) -> Iterator[str | BadRow]:
    """Each row's text (after `map_to_text_fn`), or a BadRow saying why it has none."""
    for row in rows:
        if source.map_to_text_fn is not None:
            row = source.map_to_text_fn(row)
        yield row_text(row, source.text_column)


class HubCorpus(CorpusReader):
    name = "HFStream"
    source: HFDataSource

    def spec(self) -> dict:
        spec = {k: v for k, v in asdict(self.source).items() if k not in ("map_to_text_fn", "tokenization_batch_size")}
        return {**spec, "map_to_text_fn": _function_fingerprint(self.source.map_to_text_fn)}

    def documents(self) -> Iterator[str | BadRow]:
        yield from islice(stream_values(open_stream(self.source, warn=True), self.source), self.source.max_docs)

    def reads(self, seed: int, in_miners: bool) -> list[Read]:
        num_shards = open_stream(self.source, warn=True).num_shards
        order = list(range(num_shards))
        random.Random(seed).shuffle(order)
        return [(partial(numbered, partial(_read_shard, self.source, num_shards, shard), i), [], None)
                for i, shard in enumerate(order)]


def _read_shard(source: HFDataSource, num_shards: int, index: int) -> Iterator[pa.Table]:
    return text_blocks(stream_values(open_stream(source).shard(num_shards=num_shards, index=index), source))


def _function_fingerprint(fn) -> str | None:
    """`map_to_text_fn` as a cache key takes it: its module, name and code."""
    if fn is None:
        return None
    code = getattr(fn, "__code__", None)
    body = marshal.dumps(code) if code is not None else repr(fn).encode()
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}:{hashlib.sha256(body).hexdigest()}"
