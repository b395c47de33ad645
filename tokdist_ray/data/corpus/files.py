"""The one corpus file reader, for the in-process path (corpus.documents) and for Ray
Data's read tasks (ray_corpus) alike.

Files are local paths, directories, globs, or URIs of any pyarrow filesystem (s3://,
gs://, hdfs://, file://; globs there match fnmatch-style under the part of the path
before the first wildcard). Compressed files (.gz, .bz2, .zst, ...) are opened
transparently; the suffix before the compression one says what a file holds:
    .parquet       the text column
    .jsonl/.json   one JSON object per line, its text column
    anything else  the whole file is one document
One rule for bad input: bytes that are not UTF-8 are replaced (U+FFFD), and a row
without usable text is a `BadRow` with its reason, counted and skipped by the miners,
never a crash. A "text" file with NUL bytes near its start is binary: one bad row.
A file that cannot be read as what its name says (a ".parquet" that is not parquet, a
parquet file without the text column, a truncated or corrupt compressed file) stops the
run with a CorpusFileError naming the file: its rows cannot be counted, and a run that
silently read part of the corpus would not be the run that was asked for.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from tokdist_ray.errors import CorpusError, CorpusFileError, CorpusNotFoundError
from tokdist_ray.storage import is_uri

COMPRESSION_SUFFIXES = {".gz", ".bz2", ".zst", ".lz4", ".br"}
BINARY_SNIFF_BYTES = 8192

# Why a row has no text (report keys).
MISSING_TEXT = "missing_text"  # the row has no text column, or a null there
NOT_A_STRING = "not_a_string"
INVALID_JSON = "invalid_json"
BINARY_FILE = "binary_file"
EMPTY = "empty"  # whitespace only (found by the miners)


NOT_PARQUET_FIX = ("if it holds text or JSON lines, name it .txt or .jsonl (the suffix says how a file is "
                   "read), else remove it from the corpus paths")
DAMAGED_FIX = "copy or download the file again, or remove it from the corpus paths"


@contextmanager
def reading(path: str, what: str = "read", fix: str = DAMAGED_FIX, rows: list[int] | None = None) -> Iterator[None]:
    """Errors of the file format or the stream (Arrow's, OSError: a truncated .gz)
    while reading `path` become a CorpusFileError naming it; `rows` counts what was
    read before, for a file found damaged partway."""
    try:
        yield
    except (pa.ArrowException, OSError, EOFError) as e:
        where = f" after {rows[0]} rows" if rows and rows[0] else ""
        reason = str(e).strip().rstrip(".") or type(e).__name__
        if compressed(path) and "truncated" in reason.lower():
            reason = f"its {Path(path).suffix} stream is truncated"
        raise CorpusFileError(path, f"cannot be {what}{where}: {reason}; {fix}") from e


def open_parquet(filesystem: pafs.FileSystem, path: str):
    """The pq.ParquetFile at path; a CorpusFileError where it is not parquet."""
    import pyarrow.parquet as pq

    with reading(path, "read as parquet", NOT_PARQUET_FIX):
        return pq.ParquetFile(filesystem.open_input_file(path))


@dataclass(frozen=True)
class BadRow:
    reason: str


@dataclass(frozen=True)
class CorpusFiles:
    filesystem: pafs.FileSystem
    paths: list[str]  # sorted
    sizes: list[int]
    mtimes: list[float | None]


def compressed(path: str) -> bool:
    return Path(path).suffix.lower() in COMPRESSION_SUFFIXES


def file_kind(path: str) -> str:
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes.pop()
    suffix = suffixes[-1] if suffixes else ""
    return {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix, "text")


def expand_paths(paths: str | list[str]) -> list[str]:
    """Local files named by paths, directories (searched recursively) and globs, sorted."""
    found: list[str] = []
    for pattern in [paths] if isinstance(paths, str) else paths:
        if not pattern.strip():  # Path("") is the current directory
            raise CorpusNotFoundError("an empty string is not a corpus path; name files, directories or globs")
        p = Path(pattern)
        if p.is_dir():
            found += sorted(str(f) for f in p.rglob("*") if f.is_file())
        else:
            found += sorted(glob.glob(pattern, recursive=True))
    if not found:
        raise CorpusNotFoundError(f"no corpus files match {paths!r}; check the path or glob")
    return found


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
    if not any(is_uri(p) for p in patterns):
        filesystem = pafs.LocalFileSystem()
        infos = filesystem.get_file_info(sorted({os.path.abspath(p) for p in expand_paths(patterns)}))
    elif not all(is_uri(p) for p in patterns):
        raise CorpusError(f"mix of local paths and URIs in {patterns!r}; use file:// URIs for local files")
    else:
        filesystem, infos = None, []
        for pattern in patterns:
            fs, matched = _remote_matches(pattern)
            if filesystem is not None and fs.type_name != filesystem.type_name:
                raise CorpusError(f"corpus paths span filesystems {filesystem.type_name} and {fs.type_name}; use one")
            filesystem, infos = fs, infos + matched
        if not infos:
            raise CorpusNotFoundError(f"no corpus files match {paths!r}; check the URI or glob")
        infos = sorted({i.path: i for i in infos}.values(), key=lambda i: i.path)
    mtimes = [i.mtime.timestamp() if i.mtime is not None else None for i in infos]
    return CorpusFiles(filesystem, [i.path for i in infos], [i.size for i in infos], mtimes)


def row_text(row: Any, column: str) -> str | BadRow:
    """A row's text: a str, or BadRow saying why not (a plain string row is its own text)."""
    if isinstance(row, str):
        return row
    value = row.get(column) if isinstance(row, dict) else None
    if value is None:
        return BadRow(MISSING_TEXT)
    return value if isinstance(value, str) else BadRow(NOT_A_STRING)


def _json_line_text(line: str, column: str) -> str | BadRow:
    try:
        return row_text(json.loads(line), column)
    except ValueError:
        return BadRow(INVALID_JSON)


def file_values(filesystem: pafs.FileSystem, path: str, column: str) -> Iterator[str | BadRow]:
    """The texts of a JSONL or plain text file, in file order."""
    rows = [0]
    with reading(path, rows=rows), filesystem.open_input_stream(path, compression="detect") as stream:
        if file_kind(path) == "text":
            head = stream.read(BINARY_SNIFF_BYTES)  # a binary file is not read further
            yield BadRow(BINARY_FILE) if b"\x00" in head else (head + stream.read()).decode("utf-8", errors="replace")
            return
        for line in io.TextIOWrapper(stream, encoding="utf-8", errors="replace"):
            if line.strip():
                rows[0] += 1
                yield _json_line_text(line, column)


def line_range_values(filesystem: pafs.FileSystem, path: str, start: int, end: int, column: str) -> Iterator[str | BadRow]:
    """The texts of the JSONL lines that start in [start, end)."""
    with reading(path), io.BufferedReader(filesystem.open_input_file(path)) as stream:
        if start > 0:
            stream.seek(start - 1)
            stream.readline()  # the line holding byte start - 1 is the previous slice's
        while stream.tell() < end:
            line = stream.readline()
            if not line:
                break
            if line.strip():
                yield _json_line_text(line.decode("utf-8", errors="replace"), column)


def parquet_batches(filesystem: pafs.FileSystem, path: str, column: str, row_groups=None) -> Iterator[tuple[pa.Array, str]]:
    """The text column (of `row_groups`, or all) as Arrow large_string arrays (no Python
    strings), each with the reason its nulls are bad rows; a column that does not hold
    text is all nulls."""
    parquet = open_parquet(filesystem, path)
    if column not in parquet.schema_arrow.names:
        raise CorpusFileError(path, f"has no column {column!r} (its columns: {parquet.schema_arrow.names}); set "
                                    "text_column (data.text_column in a job) to the column that holds the text")
    rows = [0]
    with reading(path, rows=rows):
        for batch in parquet.iter_batches(columns=[column], batch_size=64, row_groups=row_groups):
            rows[0] += batch.num_rows
            values = batch.column(0)
            if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
                yield values.cast(pa.large_string()), MISSING_TEXT
            else:
                yield pa.nulls(len(values), pa.large_string()), NOT_A_STRING


def texts_of_file(filesystem: pafs.FileSystem, path: str, column: str) -> Iterator[str | BadRow]:
    """Every row of one file, as text or BadRow, in file order."""
    if file_kind(path) != "parquet":
        yield from file_values(filesystem, path, column)
        return
    for values, null_reason in parquet_batches(filesystem, path, column):
        yield from (BadRow(null_reason) if v is None else v for v in values.to_pylist())
