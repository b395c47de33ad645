"""A Hugging Face dataset (HFDataSource) as a stream of texts, opened the same way for the
in-process path (corpus.documents) and for Ray Data's read tasks (ray_corpus)."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator

from tokdist_ray.config import HFDataSource
from tokdist_ray.data.corpus.files import BadRow, row_text

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
