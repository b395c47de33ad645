"""The corpus as a Ray Dataset of documents: one read task per part of the corpus
(corpus_parts: a column `text`, null where a row has no text, and a column `bad`, why
not, which the miners count and skip, as they do empty texts), plus a column `part`,
the place of the read task in the read order, which tells a miner where a row stands
in the stream. Hugging Face datasets (HFDataSource) are streamed, one read task per
shard of the IterableDataset, `map_to_text_fn` applied in the read task.

Order: files (or HF shards) in an order shuffled by the seed, rows in file order, so
what is read first is not biased toward the corpus's own order; `max_docs` keeps the
first rows of that order.

Two ways to run the read tasks:
  - local files: the read tasks ask for the miners' resources (MINER_CPUS), so Ray Data
    fuses them into the mining actors; each miner reads its own parts and the text never
    passes through the object store or a separate process. Small parts (PART_BYTES)
    keep the miners evenly loaded and the early stop prompt.
  - remote files, HF streams, and `max_docs` (a Limit between read and miners, which
    Ray Data does not fuse): plain read tasks of about TASK_BYTES that reserve no CPU,
    so that network waits overlap mining and a read never waits for a CPU the miners hold.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Any, Iterator

import pyarrow as pa

from tokdist_ray.config import FileDataSource, HFDataSource
from tokdist_ray.data.corpus.corpus_parts import corpus_parts, read_part, text_blocks
from tokdist_ray.data.corpus.files import CorpusFiles, resolve_files
from tokdist_ray.data.corpus.hf_stream import open_stream, stream_values

PART = "part"
PART_BYTES = 2 << 20  # a part read inside a miner: small, to balance miners and stop early
TASK_BYTES = 64 << 20  # a read task of its own (remote files): fewer, larger tasks
MINER_CPUS = 1  # the miners' num_cpus; local reads ask the same, which lets Ray Data fuse them


def _read_tasks(read_fns: list[tuple[Any, list[str], int | None]], per_task_row_limit):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    return [
        ReadTask(read, BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None, input_files=inputs),
                 per_task_row_limit=per_task_row_limit)
        for read, inputs, size in read_fns
    ]


def _datasource(describe: str, read_fns: list[tuple[Any, list[str], int | None]]):
    """A Ray Datasource whose read tasks are the given (read, input files, bytes)."""
    from ray.data.datasource import Datasource

    class CorpusReads(Datasource):
        def get_name(self):
            return describe

        def estimate_inmemory_data_size(self):
            sizes = [size for _, _, size in read_fns]
            return None if None in sizes else sum(sizes)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return _read_tasks(read_fns, per_task_row_limit)

    return CorpusReads()


def _numbered(read, part: int) -> Iterator[pa.Table]:
    """The blocks `read()` yields, each row tagged with its part number."""
    for block in read():
        yield block.append_column(PART, pa.array([part] * block.num_rows, pa.int64()))


def _file_reads(source: FileDataSource, seed: int, files: CorpusFiles, in_miners: bool) -> list:
    parts = corpus_parts(files, seed, PART_BYTES if in_miners else TASK_BYTES, split=in_miners)
    return [
        (partial(_numbered, partial(read_part, files.filesystem, part, source.text_column), i),
         sorted({p.path for p in part}), sum(p.size for p in part))
        for i, part in enumerate(parts)
    ]


def _reads_in_miners(source: FileDataSource, files: CorpusFiles) -> bool:
    return files.filesystem.type_name == "local" and source.max_docs is None


def files_dataset(source: FileDataSource, seed: int, files: CorpusFiles | None = None, in_miners: bool = True):
    import ray.data

    files = files or resolve_files(source.paths)
    in_miners = in_miners and _reads_in_miners(source, files)
    read_fns = _file_reads(source, seed, files, in_miners)
    if in_miners:  # one block per part as Ray Data sees it: a split factor would stop the fusion
        return ray.data.read_datasource(_datasource("CorpusFiles", read_fns), num_cpus=MINER_CPUS,
                                        override_num_blocks=len(read_fns))
    ds = ray.data.read_datasource(_datasource("CorpusFiles", read_fns), num_cpus=0)
    return ds.limit(source.max_docs) if source.max_docs is not None else ds


def _read_hf_shard(source: HFDataSource, num_shards: int, index: int) -> Iterator[pa.Table]:
    return text_blocks(stream_values(open_stream(source).shard(num_shards=num_shards, index=index), source))


def _hf_reads(source: HFDataSource, seed: int) -> list:
    num_shards = open_stream(source, warn=True).num_shards
    order = list(range(num_shards))
    random.Random(seed).shuffle(order)
    return [(partial(_numbered, partial(_read_hf_shard, source, num_shards, shard), i), [], None)
            for i, shard in enumerate(order)]


def hf_dataset(source: HFDataSource, seed: int):
    import ray.data

    ds = ray.data.read_datasource(_datasource("HFStream", _hf_reads(source, seed)), num_cpus=0)
    return ds.limit(source.max_docs) if source.max_docs is not None else ds


def corpus_blocks(source: FileDataSource | HFDataSource, seed: int, files: CorpusFiles | None = None
                  ) -> Iterator[pa.Table]:
    """The blocks corpus_dataset streams, in its order, read in this process (mining
    without Ray): the same parts, blocks and `max_docs` cut, so the same snippets."""
    if isinstance(source, FileDataSource):
        files = files or resolve_files(source.paths)
        reads = _file_reads(source, seed, files, _reads_in_miners(source, files))
    elif isinstance(source, HFDataSource):
        reads = _hf_reads(source, seed)
    else:
        raise TypeError(f"not a corpus source: {type(source).__name__}")
    left = source.max_docs
    for read, _, _ in reads:
        for block in read():
            if left is not None:
                block, left = block.slice(0, left), left - min(left, block.num_rows)
            if block.num_rows:
                yield block
            if left == 0:
                return


def corpus_dataset(source: FileDataSource | HFDataSource, seed: int, files: CorpusFiles | None = None,
                   in_miners: bool = True):
    """A Ray Dataset with columns `text`, `bad` and `part`, in the seeded read order
    described above; `in_miners=False` reads local files in tasks of their own too."""
    if isinstance(source, FileDataSource):
        return files_dataset(source, seed, files, in_miners)
    if isinstance(source, HFDataSource):
        return hf_dataset(source, seed)
    raise TypeError(f"not a corpus source: {type(source).__name__}")
