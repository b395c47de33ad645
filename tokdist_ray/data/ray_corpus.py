"""The corpus as a Ray Dataset of documents: a column `text`, holding a document's text
or None where the row has none (missing, not a string, not JSON), which the miner counts
as a bad row and skips, as it does empty texts; and a column `part`, the place of the
document's read task in the read order, which tells a miner where a row stands in the
stream.

Files (FileDataSource): local paths, directories, globs, or URIs of any pyarrow
filesystem (s3://, gs://, hdfs://, file://; globs there match fnmatch-style under the
part of the path before the first wildcard). Compressed files (.gz, .bz2, .zst, ...) are
opened transparently; the suffix before the compression one says what a file holds:
    .parquet       the text column
    .jsonl/.json   one JSON object per line, its text column
    anything else  the whole file is one document (UTF-8, bad bytes replaced)
Hugging Face datasets (HFDataSource): streamed, one read task per shard of the
IterableDataset, `map_to_text_fn` applied in the read task.

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

import fnmatch
import glob
import io
import json
import logging
import os
import random
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from tokdist_ray.config import FileDataSource, HFDataSource
from tokdist_ray.data.corpus import expand_paths

log = logging.getLogger("tokdist_ray")

TEXT = "text"
PART = "part"
BLOCK_BYTES = 2 << 20  # small blocks, so that work spreads over the miners as it streams
PART_BYTES = 2 << 20  # a part read inside a miner: small, to balance miners and stop early
TASK_BYTES = 64 << 20  # a read task of its own (remote files): fewer, larger tasks
MINER_CPUS = 1  # the miners' num_cpus; local reads ask the same, which lets Ray Data fuse them
COMPRESSION_SUFFIXES = {".gz", ".bz2", ".zst", ".lz4", ".br"}


@dataclass(frozen=True)
class CorpusFiles:
    filesystem: pafs.FileSystem
    paths: list[str]  # sorted
    sizes: list[int]
    mtimes: list[float | None]


@dataclass(frozen=True)
class Piece:
    """A file, or a slice of a large one: some parquet row groups, or the JSONL lines
    that start in [start, end)."""

    path: str
    size: int
    row_groups: tuple[int, ...] | None = None
    byte_range: tuple[int, int] | None = None


def _compressed(path: str) -> bool:
    return Path(path).suffix.lower() in COMPRESSION_SUFFIXES


def file_kind(path: str) -> str:
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes.pop()
    suffix = suffixes[-1] if suffixes else ""
    return {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix, "text")


def _is_uri(path: str) -> bool:
    return "://" in path


def _remote_matches(pattern: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    filesystem, path = pafs.FileSystem.from_uri(pattern)
    if not glob.has_magic(path):
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
            return filesystem, [i for i in infos if i.type == pafs.FileType.File]
        return filesystem, [info] if info.type == pafs.FileType.File else []
    magic = min(i for i, c in enumerate(path) if c in "*?[")
    base = path[:magic].rsplit("/", 1)[0] or "/"
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return filesystem, [i for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]


def resolve_files(paths: str | list[str]) -> CorpusFiles:
    """The files a FileDataSource names, with sizes and modification times (for the
    cache key). All patterns must be local paths or URIs of one filesystem."""
    patterns = [paths] if isinstance(paths, str) else list(paths)
    if not any(_is_uri(p) for p in patterns):
        filesystem = pafs.LocalFileSystem()
        infos = filesystem.get_file_info(sorted({os.path.abspath(p) for p in expand_paths(patterns)}))
    elif not all(_is_uri(p) for p in patterns):
        raise ValueError(f"mix of local paths and URIs in {patterns!r}; use file:// URIs for local files")
    else:
        filesystem, infos = None, []
        for pattern in patterns:
            fs, matched = _remote_matches(pattern)
            if filesystem is not None and fs.type_name != filesystem.type_name:
                raise ValueError(f"corpus paths span filesystems {filesystem.type_name} and {fs.type_name}; use one")
            filesystem, infos = fs, infos + matched
        if not infos:
            raise FileNotFoundError(f"no corpus files match {paths!r}; check the URI or glob")
        infos = sorted({i.path: i for i in infos}.values(), key=lambda i: i.path)
    mtimes = [i.mtime.timestamp() if i.mtime is not None else None for i in infos]
    return CorpusFiles(filesystem, [i.path for i in infos], [i.size for i in infos], mtimes)


# ---------------------------------------------------------------------- reading
def _text_value(row: Any, column: str) -> str | None:
    value = row.get(column) if isinstance(row, dict) else None
    return value if isinstance(value, str) else None


def _json_line_value(line: str, column: str) -> str | None:
    try:
        return _text_value(json.loads(line), column)
    except ValueError:
        return None


def _parquet_blocks(filesystem: pafs.FileSystem, path: str, column: str, row_groups=None) -> Iterator[pa.Table]:
    """The text column (of `row_groups`, or all) in blocks of about BLOCK_BYTES, kept in
    Arrow (no Python strings)."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(filesystem.open_input_file(path))
    if column not in parquet.schema_arrow.names:
        raise ValueError(f"{path} has no column {column!r} (columns: {parquet.schema_arrow.names}); set text_column")
    batches, size = [], 0
    for batch in parquet.iter_batches(columns=[column], batch_size=64, row_groups=row_groups):
        values = batch.column(0)
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            values = pa.nulls(len(values), pa.large_string())  # not text: every row is bad
        batches.append(values.cast(pa.large_string()))
        size += values.nbytes
        if size >= BLOCK_BYTES:
            yield pa.table({TEXT: pa.concat_arrays(batches)})
            batches, size = [], 0
    if batches:
        yield pa.table({TEXT: pa.concat_arrays(batches)})


def _file_values(filesystem: pafs.FileSystem, path: str, column: str) -> Iterator[str | None]:
    """The text values of a JSONL or plain text file, in file order."""
    with filesystem.open_input_stream(path, compression="detect") as stream:
        if file_kind(path) == "text":
            yield stream.read().decode("utf-8", errors="replace")
            return
        for line in io.TextIOWrapper(stream, encoding="utf-8", errors="replace"):
            if line.strip():
                yield _json_line_value(line, column)


def _line_range_values(filesystem: pafs.FileSystem, path: str, start: int, end: int, column: str) -> Iterator[str | None]:
    """The text values of the JSONL lines that start in [start, end)."""
    with io.BufferedReader(filesystem.open_input_file(path)) as stream:
        if start > 0:
            stream.seek(start - 1)
            stream.readline()  # the line holding byte start - 1 is the previous slice's
        while stream.tell() < end:
            line = stream.readline()
            if not line:
                break
            if line.strip():
                yield _json_line_value(line.decode("utf-8", errors="replace"), column)


def _piece_values(filesystem: pafs.FileSystem, piece: Piece, column: str) -> Iterator[str | None]:
    if piece.byte_range is not None:
        return _line_range_values(filesystem, piece.path, *piece.byte_range, column)
    return _file_values(filesystem, piece.path, column)


def text_blocks(values: Iterable[str | None], max_bytes: int = BLOCK_BYTES) -> Iterator[pa.Table]:
    """Tables of one `text` column, each up to about max_bytes of text."""
    block: list[str | None] = []
    size = 0
    for value in values:
        block.append(value)
        size += len(value) if value else 0
        if size >= max_bytes:
            yield pa.table({TEXT: pa.array(block, pa.large_string())})
            block, size = [], 0
    if block:
        yield pa.table({TEXT: pa.array(block, pa.large_string())})


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
    if size <= part_bytes or _compressed(path) or kind == "text":
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


def _hf_shard_values(source: HFDataSource, num_shards: int, index: int) -> Iterator[str | None]:
    for row in open_hf_stream(source).shard(num_shards=num_shards, index=index):
        if source.map_to_text_fn is not None:
            row = source.map_to_text_fn(row)
        yield row if isinstance(row, str) else _text_value(row, source.text_column)


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
