"""A FileDataSource read: local or object-storage files through the one file reader (files.py),
cut into parts (corpus_parts.py) in the seeded order."""

from __future__ import annotations

import os
from functools import cached_property, partial
from itertools import chain, islice
from typing import Iterator

import pyarrow.fs as pafs

from tokdist_ray.config import FileDataSource
from tokdist_ray.data.corpus.corpus_parts import corpus_parts, read_part
from tokdist_ray.data.corpus.files import (
    BadRow,
    CorpusFiles,
    compressed,
    expand_paths,
    file_kind,
    resolve_files,
    texts_of_file,
)
from tokdist_ray.data.corpus.ray_corpus import numbered
from tokdist_ray.data.corpus.source import CorpusReader, Read
from tokdist_ray.storage import is_uri

PART_BYTES = 2 << 20  # a part read inside a miner: small, to balance miners and stop early
TASK_BYTES = 64 << 20  # a read task of its own (remote files): fewer, larger tasks


class FileCorpus(CorpusReader):
    name = "CorpusFiles"
    source: FileDataSource

    @cached_property
    def files(self) -> CorpusFiles:
        """The files the paths name, with sizes and times (listed once: object storage is slow to list)."""
        return resolve_files(self.source.paths)

    def spec(self) -> dict:
        files = self.files
        return {"files": [list(f) for f in zip(files.paths, files.sizes, files.mtimes)],
                "text_column": self.source.text_column, "max_docs": self.source.max_docs}

    def documents(self) -> Iterator[str | BadRow]:
        filesystem, paths = _files_in_order(self.source.paths)
        rows = chain.from_iterable(texts_of_file(filesystem, path, self.source.text_column) for path in paths)
        yield from islice(rows, self.source.max_docs)

    def reads(self, seed: int, in_miners: bool) -> list[Read]:
        files = self.files
        parts = corpus_parts(files, seed, PART_BYTES if in_miners else TASK_BYTES, split=in_miners)
        return [
            (partial(numbered, partial(read_part, files.filesystem, part, self.source.text_column), i),
             sorted({p.path for p in part}), sum(p.size for p in part))
            for i, part in enumerate(parts)
        ]

    def text_bytes(self) -> int | None:
        """Known where every file is plain text (a compressed or parquet file's size says little of its text)."""
        if any(compressed(p) or file_kind(p) == "parquet" for p in self.files.paths):
            return None
        return sum(self.files.sizes)

    def fuses_with_miners(self) -> bool:
        """Local files, read whole: a `max_docs` cut puts a Limit between read and miners,
        which Ray Data does not fuse."""
        return self.files.filesystem.type_name == "local" and self.source.max_docs is None


def _files_in_order(paths: str | list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """Local files in the order the paths name them (each directory or glob sorted);
    URIs through resolve_files."""
    patterns = [paths] if isinstance(paths, str) else list(paths)
    if any(is_uri(p) for p in patterns):
        files = resolve_files(patterns)
        return files.filesystem, files.paths
    return pafs.LocalFileSystem(), [os.path.abspath(p) for p in expand_paths(patterns)]
