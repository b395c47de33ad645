"""Documents from a corpus, streamed: local files or a Hugging Face dataset.

Yields each row's text value as found, which may be missing or not a string; the
consumer counts and skips those (see snippets.mine_snippets), so a bad row never stops
a run.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Any, Iterator

from tokdist_ray.config import FileDataSource, HFDataSource
from tokdist_ray.errors import CorpusNotFoundError

log = logging.getLogger("tokdist_ray")

PLAIN_TEXT_SUFFIXES = {".txt", ".rst", ".md", ".text", ""}


def expand_paths(paths: str | list[str]) -> list[str]:
    """Files named by paths, directories (searched recursively) and globs, sorted."""
    found: list[str] = []
    for pattern in [paths] if isinstance(paths, str) else paths:
        p = Path(pattern)
        if p.is_dir():
            found += sorted(str(f) for f in p.rglob("*") if f.is_file())
        else:
            found += sorted(glob.glob(pattern, recursive=True))
    if not found:
        raise CorpusNotFoundError(f"no corpus files match {paths!r}; check the path or glob")
    return found


def _file_rows(path: str, text_column: str) -> Iterator[Any]:
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table_file = pq.ParquetFile(path)
        if text_column not in table_file.schema_arrow.names:
            raise ValueError(f"{path} has no column {text_column!r} (columns: {table_file.schema_arrow.names}); set text_column")
        for record_batch in table_file.iter_batches(columns=[text_column]):
            yield from record_batch.column(0).to_pylist()
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError:  # a line that is not JSON is a bad row, not a crash
                        row = None
                    yield row.get(text_column) if isinstance(row, dict) else None
    else:
        yield Path(path).read_text(encoding="utf-8", errors="replace")


def file_documents(source: FileDataSource) -> Iterator[Any]:
    n = 0
    for path in expand_paths(source.paths):
        for text in _file_rows(path, source.text_column):
            if source.max_docs is not None and n >= source.max_docs:
                return
            n += 1
            yield text


def hf_documents(source: HFDataSource) -> Iterator[Any]:
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
        yield row.get(source.text_column) if isinstance(row, dict) else row


def documents(source: FileDataSource | HFDataSource) -> Iterator[Any]:
    if isinstance(source, FileDataSource):
        return file_documents(source)
    if isinstance(source, HFDataSource):
        return hf_documents(source)
    raise TypeError(f"not a corpus source: {type(source).__name__}")
