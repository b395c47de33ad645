"""Documents from a corpus, streamed in this process: FileDataSource files through the one
reader (files.py: local or object storage, compressed or not), or a Hugging Face dataset.

Yields each row's text, or a files.BadRow saying why the row has none; the consumer
counts and skips those (see local_mining.mine_snippets), so a bad row never stops a run.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import pyarrow.fs as pafs

from tokdist_ray.config import FileDataSource, HFDataSource
from tokdist_ray.data.files import BadRow, expand_paths, resolve_files, row_text, texts_of_file
from tokdist_ray.storage import is_uri

log = logging.getLogger("tokdist_ray")


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
    n = 0
    for path in paths:
        for text in texts_of_file(filesystem, path, source.text_column):
            if source.max_docs is not None and n >= source.max_docs:
                return
            n += 1
            yield text


def hf_documents(source: HFDataSource) -> Iterator[str | BadRow]:
    import datasets

    kwargs = {"name": source.name, "split": source.split, "streaming": True, "revision": source.revision}
    if source.data_files is not None:
        kwargs["data_files"] = source.data_files
    if source.trust_remote_code:
        log.warning("trust_remote_code is ignored: datasets no longer runs dataset scripts")
    stream = datasets.load_dataset(source.dataset_path, **kwargs)
    for n, row in enumerate(stream):
        if source.max_docs is not None and n >= source.max_docs:
            return
        if source.map_to_text_fn is not None:
            row = source.map_to_text_fn(row)
        yield row_text(row, source.text_column)


def documents(source: FileDataSource | HFDataSource) -> Iterator[str | BadRow]:
    if isinstance(source, FileDataSource):
        return file_documents(source)
    if isinstance(source, HFDataSource):
        return hf_documents(source)
    raise TypeError(f"not a corpus source: {type(source).__name__}")
