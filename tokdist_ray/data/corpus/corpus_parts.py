"""The corpus cut into parts, and a part read into Arrow blocks: what one Ray Data read
task does (ray_corpus builds the tasks).

A part is a run of consecutive small files, or a slice of a large one (parquet row
groups, or the lines of an uncompressed JSONL file that start in a byte range), about
`part_bytes` each, in an order shuffled by the seed. A part streams in blocks of about
BLOCK_BYTES with a column `text` (null where a row has no text) and a column `bad` (why
not: a files.BadRow reason).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from tokdist_ray.data.corpus.files import (
    BadRow,
    CorpusFiles,
    compressed,
    file_kind,
    file_values,
    line_range_values,
    open_parquet,
    parquet_batches,
)

TEXT = "text"
BAD = "bad"  # why a row has no text (files.BadRow reasons), null for good rows
BLOCK_BYTES = 2 << 20  # small blocks, so that work spreads over the miners as it streams


@dataclass(frozen=True)
class Piece:
    """A file, or a slice of a large one: some parquet row groups, or the JSONL lines
    that start in [start, end)."""

    path: str
    size: int
    row_groups: tuple[int, ...] | None = None
    byte_range: tuple[int, int] | None = None


def _slices(filesystem: pafs.FileSystem, path: str, size: int, part_bytes: int) -> list[Piece]:
    """A large parquet or uncompressed JSONL file in slices of about part_bytes; any
    other file whole."""
    kind = file_kind(path)
    if size <= part_bytes or compressed(path) or kind == "text":
        return [Piece(path, size)]
    if kind == "jsonl":
        return [Piece(path, min(part_bytes, size - a), byte_range=(a, min(a + part_bytes, size)))
                for a in range(0, size, part_bytes)]
    metadata = open_parquet(filesystem, path).metadata
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
