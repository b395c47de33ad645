"""Documents from a corpus, streamed in this process: FileDataSource files through the one
reader (files.py: local or object storage, compressed or not), or a Hugging Face dataset.

Yields each row's text, or a files.BadRow saying why the row has none; the consumer
counts and skips those (see local_mining.mine_snippets), so a bad row never stops a run.
"""

from __future__ import annotations

import os
from itertools import chain, islice
from typing import Iterator

import pyarrow.fs as pafs

from tokdist_ray.config import FileDataSource, HFDataSource
from tokdist_ray.data.corpus.chunks import split_document
from tokdist_ray.data.corpus.files import BadRow, expand_paths, resolve_files, texts_of_file
from tokdist_ray.data.corpus.hf_stream import open_stream, stream_values
from tokdist_ray.storage import is_uri


def _files_in_order(paths: str | list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """Local files in the order the paths name them (each directory or glob sorted);
    URIs through resolve_files."""
    patterns = [paths] if isinstance(paths, str) else list(paths)
    if any(is_uri(p) for p in patterns):
        files = resolve_files(patterns)
        return files.filesystem, files.paths
    return pafs.LocalFileSystem(), [os.path.abspath(p) for p in expand_paths(patterns)]


def file_documents(source: FileDataSource) -> Iterator[str | BadRow]:
    filesystem, paths = _files_in_order(source.paths)
    rows = chain.from_iterable(texts_of_file(filesystem, path, source.text_column) for path in paths)
    yield from islice(rows, source.max_docs)


def hf_documents(source: HFDataSource) -> Iterator[str | BadRow]:
    yield from islice(stream_values(open_stream(source, warn=True), source), source.max_docs)


def documents(source: FileDataSource | HFDataSource) -> Iterator[str | BadRow]:
    if isinstance(source, FileDataSource):
        return file_documents(source)
    if isinstance(source, HFDataSource):
        return hf_documents(source)
    raise TypeError(f"not a corpus source: {type(source).__name__}")


FIT_CHUNK_BYTES = 2000


def text_sample(source: FileDataSource | HFDataSource, text_bytes: int, stride: int = 1) -> list[str]:
    """Every `stride`-th chunk of the corpus's documents (cut as held-out text is cut, at
    most FIT_CHUNK_BYTES each) until `text_bytes` are taken: text spread over the first
    stride x text_bytes bytes rather than the first documents alone. Rows without text
    are skipped, as mining skips them."""
    chunks, taken, seen = [], 0, 0
    for doc in documents(source):
        if isinstance(doc, BadRow):
            continue
        for chunk in split_document(doc, FIT_CHUNK_BYTES):
            seen += 1
            if (seen - 1) % stride:
                continue
            chunks.append(chunk)
            taken += len(chunk.encode("utf-8"))
            if taken >= text_bytes:
                return chunks
    return chunks
