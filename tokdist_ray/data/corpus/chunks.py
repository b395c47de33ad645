"""Text cut into chunks of at most so many UTF-8 bytes, at line breaks where it can: how
held-out text is scored and how the output fit reads the corpus."""

from __future__ import annotations

from typing import Iterator


def split_document(doc: str, limit: int) -> Iterator[str]:
    """Contiguous pieces of at most `limit` UTF-8 bytes whose concatenation is `doc`."""
    data = doc.encode("utf-8")
    start = 0
    while len(data) - start > limit:
        end = start + limit
        cut = data.rfind(b"\n", start, end) + 1  # after the last line break that fits
        if cut <= start:
            # before a space or tab: byte-level BPE attaches it to the word that follows
            cut = max(data.rfind(b" ", start + 1, end + 1), data.rfind(b"\t", start + 1, end + 1))
        if cut <= start:
            cut = end
            while data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: back off to the character start
                cut -= 1
        yield data[start:cut].decode("utf-8")
        start = cut
    if start < len(data):
        yield data[start:].decode("utf-8")
