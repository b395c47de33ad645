"""The one place that tells corpus sources apart: each settings class of config.py names
its reader here.

To add a source: its settings class in config.py (and its `data.source` name in
config.CORPUS_SOURCES, for the job), a reader module in this package (one CorpusReader
class), and its line in READERS."""

from __future__ import annotations

from tokdist_ray.config import FileDataSource, HFDataSource
from tokdist_ray.data.corpus.file_source import FileCorpus
from tokdist_ray.data.corpus.hub_source import HubCorpus
from tokdist_ray.data.corpus.source import CorpusReader

READERS: dict[type, type[CorpusReader]] = {FileDataSource: FileCorpus, HFDataSource: HubCorpus}


def corpus_reader(source) -> CorpusReader:
    """The reader of a corpus source (a FileDataSource or an HFDataSource)."""
    reader = READERS.get(type(source))
    if reader is None:
        known = ", ".join(cls.__name__ for cls in READERS)
        raise TypeError(f"not a corpus source: {type(source).__name__}; use one of {known}")
    return reader(source)
