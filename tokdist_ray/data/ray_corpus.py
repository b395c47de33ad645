"""The corpus as a Ray Dataset of documents, read with the one reader (files.py): a
column `text` (null where a row has no text), a column `bad` (why not: a files.BadRow
reason), which the miners count and skip, as they do empty texts; and a column `part`,
the place of the document's read task in the read order, which tells a miner where a
row stands in the stream. Hugging Face datasets (HFDataSource) are streamed, one read
task per shard of the IterableDataset, `map_to_text_fn` applied in the read task.

Order: files (or HF shards) in an order shuffled by the seed, rows in file order, so
what is read first is not biased toward the corpus's own order; `max_docs` keeps the
first rows of that order.

Reading is a read task per *part* of the corpus: a run of consecutive small files, or a
slice of a large one (parquet row groups, or the lines of an uncompressed JSONL file
that start in a byte range), about PART_BYTES each; a part streams in blocks of about
BLOCK_BYTES. Two ways to run them:
  - local files: the read tasks ask for the miners' resources (MINER_CPUS), so Ray Data
    fuses them into the mining actors; each miner reads its own parts and the text never
    passes through the object store or a separate process. Small parts keep the miners
    evenly loaded and the early stop prompt.
  - remote files, HF streams, and `max_docs` (a Limit between read and miners, which
    Ray Data does not fuse): plain read tasks that reserve no CPU, so that network waits
    overlap mining and a read never waits for a CPU the miners hold.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from tokdist_ray.config import FileDataSource, HFDataSource
from tokdist_ray.data.files import (
    BadRow,
    CorpusFiles,
    compressed,
    file_kind,
    file_values,
    line_range_values,
    parquet_batches,
    resolve_files,
    row_text,
)

log = logging.getLogger("tokdist_ray")

TEXT = "text"
BAD = "bad"  # why a row has no text (files.BadRow reasons), null for good rows
PART = "part"
BLOCK_BYTES = 2 << 20  # small blocks, so that work spreads over the miners as it streams
PART_BYTES = 2 << 20  # a part read inside a miner: small, to balance miners and stop early
TASK_BYTES = 64 << 20  # a read task of its own (remote files): fewer, larger tasks
MINER_CPUS = 1  # the miners' num_cpus; local reads ask the same, which lets Ray Data fuse them


@dataclass(frozen=True)
class Piece:
    """A file, or a slice of a large one: some parquet row groups, or the JSONL lines
    that start in [start, end)."""

    path: str
    size: int
    row_groups: tuple[int, ...] | None = None
    byte_range: tuple[int, int] | None = None


# ---------------------------------------------------------------------- reading
def _parquet_blocks(filesystem: pafs.FileSystem, path: str, column: str, row_groups=None) -> Iterator[pa.Table]:
    """The text column in blocks of about BLOCK_BYTES, kept in Arrow (no Python strings)."""
    texts, reasons, size = [], [], 0
    for values, null_reason in parquet_batches(filesystem, path, column, row_groups):
        texts.append(values)
        reasons.append(pc.if_else(pc.is_null(values), null_reason, pa.scalar(None, pa.string())))
        size += values.nbytes
        if size >= BLOCK_BYTES:
            yield pa.table({TEXT: pa.concat_arrays(texts), BAD: pa.concat_arrays(reasons)})
            texts, reasons, size = [], [], 0
    if texts:
        yield pa.table({TEXT: pa.concat_arrays(texts), BAD: pa.concat_arrays(reasons)})


def _piece_values(filesystem: pafs.FileSystem, piece: Piece, column: str) -> Iterator[str | BadRow]:
    if piece.byte_range is not None:
        return line_range_values(filesystem, piece.path, *piece.byte_range, column)
    return file_values(filesystem, piece.path, column)


def text_blocks(values: Iterable[str | BadRow], max_bytes: int = BLOCK_BYTES) -> Iterator[pa.Table]:
    """Tables of a `text` column (null for bad rows) and a `bad` column (their reason),
    each up to about max_bytes of text."""
    texts: list[str | None] = []
    size = 0
    for value in values:
        texts.append(value)
        size += len(value) if isinstance(value, str) else 0
        if size >= max_bytes:
            yield _text_table(texts)
            texts, size = [], 0
    if texts:
        yield _text_table(texts)


def _text_table(values: list[str | BadRow]) -> pa.Table:
    bad = [v.reason if isinstance(v, BadRow) else None for v in values]
    text = [None if isinstance(v, BadRow) else v for v in values]
    return pa.table({TEXT: pa.array(text, pa.large_string()), BAD: pa.array(bad, pa.string())})


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


def read_part(filesystem, pieces: list[Piece], column: str) -> Iterator[pa.Table]:
    """Blocks of the pieces in order; runs of JSONL and text pieces share blocks."""
    run: list[Piece] = []
    for piece in pieces + [None]:
        if piece is not None and file_kind(piece.path) != "parquet":
            run.append(piece)
            continue
        yield from text_blocks(chain.from_iterable(_piece_values(filesystem, p, column) for p in run))
        run = []
        if piece is not None:
            yield from _parquet_blocks(filesystem, piece.path, column, piece.row_groups)


def _slices(filesystem: pafs.FileSystem, path: str, size: int, part_bytes: int) -> list[Piece]:
    """A large parquet or uncompressed JSONL file in slices of about part_bytes; any
    other file whole."""
    kind = file_kind(path)
    if size <= part_bytes or compressed(path) or kind == "text":
        return [Piece(path, size)]
    if kind == "jsonl":
        return [Piece(path, min(part_bytes, size - a), byte_range=(a, min(a + part_bytes, size)))
                for a in range(0, size, part_bytes)]
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(filesystem.open_input_file(path)).metadata
    slices, groups, stored = [], [], 0
    for g in range(metadata.num_row_groups):
        row_group = metadata.row_group(g)
        groups.append(g)
        stored += sum(row_group.column(c).total_compressed_size for c in range(row_group.num_columns))
        if stored >= part_bytes or g == metadata.num_row_groups - 1:
            slices.append(Piece(path, stored, row_groups=tuple(groups)))
            groups, stored = [], 0
    return slices if len(slices) > 1 else [Piece(path, size)]


def corpus_parts(files: CorpusFiles, seed: int, part_bytes: int, split: bool) -> list[list[Piece]]:
    """The files in seeded order, as parts of about part_bytes: consecutive small files
    share a part; with `split`, large files are cut into slices, a part each."""
    order = list(zip(files.paths, files.sizes))
    random.Random(seed).shuffle(order)
    parts: list[list[Piece]] = []
    filled = 0  # bytes in the last part
    for path, size in order:
        pieces = _slices(files.filesystem, path, size, part_bytes) if split else [Piece(path, size)]
        for piece in pieces:
            if parts and filled + piece.size <= part_bytes:
                parts[-1].append(piece)
                filled += piece.size
            else:
                parts.append([piece])
                filled = piece.size
    return parts


def files_dataset(source: FileDataSource, seed: int, files: CorpusFiles | None = None, in_miners: bool = True):
    import ray.data

    files = files or resolve_files(source.paths)
    in_miners = in_miners and files.filesystem.type_name == "local" and source.max_docs is None
    parts = corpus_parts(files, seed, PART_BYTES if in_miners else TASK_BYTES, split=in_miners)
    read_fns = [
        (partial(_numbered, partial(read_part, files.filesystem, part, source.text_column), i),
         sorted({p.path for p in part}), sum(p.size for p in part))
        for i, part in enumerate(parts)
    ]
    if in_miners:  # one block per part as Ray Data sees it: a split factor would stop the fusion
        return ray.data.read_datasource(_datasource("CorpusFiles", read_fns), num_cpus=MINER_CPUS,
                                        override_num_blocks=len(read_fns))
    ds = ray.data.read_datasource(_datasource("CorpusFiles", read_fns), num_cpus=0)
    return ds.limit(source.max_docs) if source.max_docs is not None else ds


# ---------------------------------------------------------------------- Hugging Face
def open_hf_stream(source: HFDataSource):
    import datasets

    kwargs = {"name": source.name, "split": source.split, "streaming": True, "revision": source.revision}
    if source.data_files is not None:
        kwargs["data_files"] = source.data_files
    return datasets.load_dataset(source.dataset_path, **kwargs)


def _hf_shard_values(source: HFDataSource, num_shards: int, index: int) -> Iterator[str | BadRow]:
    for row in open_hf_stream(source).shard(num_shards=num_shards, index=index):
        if source.map_to_text_fn is not None:
            row = source.map_to_text_fn(row)
        yield row_text(row, source.text_column)


def _read_hf_shard(source: HFDataSource, num_shards: int, index: int) -> Iterator[pa.Table]:
    return text_blocks(_hf_shard_values(source, num_shards, index))


def hf_dataset(source: HFDataSource, seed: int):
    import ray.data

    if source.trust_remote_code:
        log.warning("trust_remote_code is ignored: datasets no longer runs dataset scripts")
    num_shards = open_hf_stream(source).num_shards
    order = list(range(num_shards))
    random.Random(seed).shuffle(order)
    read_fns = [(partial(_numbered, partial(_read_hf_shard, source, num_shards, shard), i), [], None)
                for i, shard in enumerate(order)]
    ds = ray.data.read_datasource(_datasource("HFStream", read_fns), num_cpus=0)
    return ds.limit(source.max_docs) if source.max_docs is not None else ds


def corpus_dataset(source: FileDataSource | HFDataSource, seed: int, files: CorpusFiles | None = None,
                   in_miners: bool = True):
    """A Ray Dataset with a `text` column, in the seeded read order described above;
    `in_miners=False` reads local files in tasks of their own too."""
    if isinstance(source, FileDataSource):
        return files_dataset(source, seed, files, in_miners)
    if isinstance(source, HFDataSource):
        return hf_dataset(source, seed)
    raise TypeError(f"not a corpus source: {type(source).__name__}")
