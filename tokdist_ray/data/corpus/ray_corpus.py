"""The corpus as a Ray Dataset of documents, whatever its source (source.CorpusReader gives
the read tasks): one read task per part of the corpus
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
    passes through the object store or a separate process. Small parts
    (file_source.PART_BYTES) keep the miners evenly loaded and the early stop prompt.
  - remote files, HF streams, and `max_docs` (a Limit between read and miners, which
    Ray Data does not fuse): plain read tasks (of about file_source.TASK_BYTES) that reserve no CPU,
    so that network waits overlap mining and a read never waits for a CPU the miners hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import pyarrow as pa

if TYPE_CHECKING:
    from tokdist_ray.data.corpus.source import CorpusReader, Read

PART = "part"
MINER_CPUS = 1  # the miners' num_cpus; local reads ask the same, which lets Ray Data fuse them


def _read_tasks(read_fns: list[Read], per_task_row_limit):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    return [
        ReadTask(read, BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None, input_files=inputs),
                 per_task_row_limit=per_task_row_limit)
        for read, inputs, size in read_fns
    ]


def _datasource(describe: str, read_fns: list[Read]):
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


def numbered(read, part: int) -> Iterator[pa.Table]:
    """The blocks `read()` yields, each row tagged with its part number."""
    for block in read():
        yield block.append_column(PART, pa.array([part] * block.num_rows, pa.int64()))


def corpus_blocks(corpus: CorpusReader, seed: int) -> Iterator[pa.Table]:
    """The blocks corpus_dataset streams, in its order, read in this process (mining
    without Ray): the same parts, blocks and `max_docs` cut, so the same snippets."""
    left = corpus.max_docs
    for read, _, _ in corpus.reads(seed, corpus.fuses_with_miners()):
        for block in read():
            if left is not None:
                block, left = block.slice(0, left), left - min(left, block.num_rows)
            if block.num_rows:
                yield block
            if left == 0:
                return


def corpus_dataset(corpus: CorpusReader, seed: int, in_miners: bool = True):
    """A Ray Dataset with columns `text`, `bad` and `part`, in the seeded read order
    described above; `in_miners=False` reads local files in tasks of their own too."""
    import ray.data

    in_miners = in_miners and corpus.fuses_with_miners()
    reads = corpus.reads(seed, in_miners)
    if in_miners:  # one block per part as Ray Data sees it: a split factor would stop the fusion
        return ray.data.read_datasource(_datasource(corpus.name, reads), num_cpus=MINER_CPUS,
                                        override_num_blocks=len(reads))
    ds = ray.data.read_datasource(_datasource(corpus.name, reads), num_cpus=0)
    return ds.limit(corpus.max_docs) if corpus.max_docs is not None else ds
