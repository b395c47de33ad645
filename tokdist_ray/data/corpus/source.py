"""What reading one kind of corpus source takes (a FileDataSource, an HFDataSource): the
interface each source's reader implements. sources.py picks the reader of a source."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator

import pyarrow as pa

from tokdist_ray.data.corpus.files import BadRow

# one Ray Data read task: (its read function, yielding Arrow blocks; the files it reads; its bytes, if known)
Read = tuple[Callable[[], Iterator[pa.Table]], list[str], int | None]


class CorpusReader(ABC):
    """One corpus source read the ways the stages need: keyed, streamed in this process,
    and as Ray Data read tasks in a seeded order. Whatever the reader, the same seed gives
    the same documents in the same order."""

    name: str  # Ray Data's name for the read

    def __init__(self, source: Any):
        self.source = source

    @property
    def max_docs(self) -> int | None:
        """The first documents of the seeded order that are read; None: all."""
        return self.source.max_docs

    @abstractmethod
    def spec(self) -> dict:
        """What the corpus holds, as the mining cache and the job's stage keys take it."""

    @abstractmethod
    def documents(self) -> Iterator[str | BadRow]:
        """Each document's text in this process, in the source's own order, `max_docs` cut."""

    @abstractmethod
    def reads(self, seed: int, in_miners: bool) -> list[Read]:
        """The read tasks in the seeded order, each yielding blocks with the columns `text`
        and `bad` (corpus_parts.text_blocks); `in_miners`: sized to run inside the miners."""

    def text_bytes(self) -> int | None:
        """The bytes of text it holds, where its size tells (for progress lines); None otherwise."""
        return None

    def fuses_with_miners(self) -> bool:
        """Whether its read tasks can run inside the mining actors (ray_corpus)."""
        return False
