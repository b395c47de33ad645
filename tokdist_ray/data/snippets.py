"""Snippets: the schema every source writes, windows around an occurrence, and the
in-process corpus miner.

A snippet is `[BOS] + window`, a window being up to `snippet_len` original ids around
one occurrence of a new token's phrase. Near either end of a document the window
borrows context from the other side instead of being dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import pyarrow as pa

from tokdist_ray.vocab.alignment import PhraseMerger

if TYPE_CHECKING:  # keeps transformers out of processes that only need windows (mining actors)
    from tokdist_ray.vocab.tokens import NewToken

log = logging.getLogger("tokdist_ray")

SNIPPET_SCHEMA = pa.schema(
    [
        ("token", pa.string()),
        ("token_index", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("phrase_start", pa.int32()),  # index of the phrase's first id within input_ids
        ("source", pa.string()),  # "corpus" | "generated"
    ]
)


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] for tokenizers that have one; [] for BOS-less ones such as Qwen's."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def window_around(ids: Sequence[int], start: int, length: int, snippet_len: int) -> tuple[list[int], int]:
    """Up to `snippet_len` ids holding ids[start:start+length], the phrase centred where
    the document allows; context missing on one side is taken from the other.
    Returns (window, phrase start within the window)."""
    free = max(0, snippet_len - length)
    after_avail = len(ids) - start - length
    before = min(start, free // 2)
    after = min(after_avail, free - before)
    before = min(start, free - after)  # borrow what the end could not give
    lo = start - before
    return list(ids[lo : start + length + after]), before


@dataclass
class MiningStats:
    documents: int = 0
    bad_rows: int = 0  # missing, non-string or empty text
    bytes: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    topped_up: dict[str, int] = field(default_factory=dict)  # generated to fill a shortfall

    def as_dict(self, quota: int) -> dict:
        short = {t: c for t, c in self.counts.items() if c < quota}
        return {
            "documents": self.documents,
            "bad_rows": self.bad_rows,
            "megabytes": round(self.bytes / 1e6, 3),
            "seconds": round(self.seconds, 3),
            "snippets_per_token": self.counts,
            "short_of_quota": short,
            "topped_up_by_generation": self.topped_up,
        }


def snippet_row(token: NewToken, index: int, ids: list[int], phrase_start: int, source: str) -> dict:
    return {"token": token.text, "token_index": index, "input_ids": ids, "phrase_start": phrase_start, "source": source}


def mine_snippets(
    documents: Iterable[Any],
    tokenizer,
    tokens: Sequence[NewToken],
    snippet_len: int = 50,
    snippets_per_token: int = 100,
    batch_size: int = 256,
) -> tuple[list[dict], MiningStats]:
    """Collect up to `snippets_per_token` distinct snippets per token, in corpus order,
    stopping as soon as every token has its quota."""
    merger = PhraseMerger.for_tokens(tokens)
    prefix = bos_prefix(tokenizer)
    stats = MiningStats(counts={t.text: 0 for t in tokens})
    seen: set[tuple[int, ...]] = set()
    rows: list[dict] = []
    open_tokens = len(tokens)
    start, last_log = time.perf_counter(), time.perf_counter()

    def scan(texts: list[str]) -> None:
        nonlocal open_tokens
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            for pos, length, index in merger.occurrences(ids):
                token = tokens[index]
                if stats.counts[token.text] >= snippets_per_token:
                    continue
                window, offset = window_around(ids, pos, length, snippet_len)
                snippet = prefix + window
                if tuple(snippet) in seen:
                    continue
                seen.add(tuple(snippet))
                rows.append(snippet_row(token, index, snippet, len(prefix) + offset, "corpus"))
                stats.counts[token.text] += 1
                if stats.counts[token.text] == snippets_per_token:
                    open_tokens -= 1

    pending: list[str] = []
    for text in documents:
        if not isinstance(text, str) or not text.strip():
            stats.bad_rows += 1
            continue
        stats.documents += 1
        stats.bytes += len(text.encode("utf-8"))
        pending.append(text)
        if len(pending) >= batch_size:
            scan(pending)
            pending = []
            if time.perf_counter() - last_log > 10:
                last_log = time.perf_counter()
                log.info("mining: %d documents, %.1f MB, %d/%d tokens at quota",
                         stats.documents, stats.bytes / 1e6, len(tokens) - open_tokens, len(tokens))
            if open_tokens == 0:
                break
    if pending and open_tokens:
        scan(pending)
    stats.seconds = time.perf_counter() - start
    return rows, stats


def snippets_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SNIPPET_SCHEMA)
