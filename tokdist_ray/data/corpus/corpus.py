"""Documents from a corpus source, streamed in this process (through its reader:
sources.corpus_reader), and a text sample spread over them.

Yields each row's text, or a files.BadRow saying why the row has none; the consumer
counts and skips those (see local_mining.mine_snippets), so a bad row never stops a run.
"""

from __future__ import annotations

from typing import Callable, Iterator

from tokdist_ray.config import FileDataSource, HFDataSource
from tokdist_ray.data.corpus.chunks import split_document
from tokdist_ray.data.corpus.files import BadRow
from tokdist_ray.data.corpus.sources import corpus_reader


def documents(source: FileDataSource | HFDataSource) -> Iterator[str | BadRow]:
    return corpus_reader(source).documents()


FIT_CHUNK_BYTES = 2000


def text_sample(source: FileDataSource | HFDataSource, text_bytes: int, stride: int = 1,
                enough: Callable[[str], bool] | None = None) -> list[str]:
    """Every `stride`-th chunk of the corpus's documents (cut as held-out text is cut, at
    most FIT_CHUNK_BYTES each) until `text_bytes` are taken, or `enough(chunk)` says so
    after a chunk is taken: text spread over the first stride x text_bytes bytes rather
    than the first documents alone. Rows without text are skipped, as mining skips them."""
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
            if taken >= text_bytes or enough is not None and enough(chunk):
                return chunks
    return chunks
