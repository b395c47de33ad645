"""The in-process corpus miner: the API's path when no Ray cluster is running, and the
held-out evaluation's. Same windows as the Ray miners (mining.py), without Ray."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Iterable

from tokdist_ray.data.files import EMPTY, NOT_A_STRING, BadRow
from tokdist_ray.data.snippets import MiningStats, bos_prefix, settle, snippet_row, window_around

if TYPE_CHECKING:
    from tokdist_ray.vocab.merges import MergeExpansion

log = logging.getLogger("tokdist_ray")


def mine_snippets(
    documents: Iterable[Any],
    expansion: MergeExpansion,
    snippet_len: int = 50,
    snippets_per_token: int = 100,
    batch_size: int = 256,
) -> tuple[list[dict], MiningStats]:
    """Collect up to `snippets_per_token` distinct snippets per token, in corpus order,
    stopping as soon as every token has its quota. Snippets hold the expanded
    tokenizer's ids."""
    tokenizer, tokens, new_start = expansion.tokenizer, expansion.tokens, expansion.new_start
    backend = tokenizer.backend_tokenizer
    prefix = bos_prefix(tokenizer)
    stats = MiningStats(counts={t.text: 0 for t in tokens})
    seen: set[tuple[int, ...]] = set()
    rows: list[dict] = []
    open_tokens = len(tokens)
    start, last_log = time.perf_counter(), time.perf_counter()

    def scan(texts: list[str]) -> None:
        nonlocal open_tokens
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            for pos, token_id in enumerate(ids):
                if token_id < new_start:
                    continue
                index = token_id - new_start
                token = tokens[index]
                if stats.counts[token.text] >= snippets_per_token:
                    continue
                settled = settle(backend, *window_around(ids, pos, 1, snippet_len))
                if settled is None:
                    continue
                window, offset = settled
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
        if isinstance(text, BadRow):
            stats.add_bad(text.reason)
            continue
        if not isinstance(text, str) or not text.strip():
            stats.add_bad(EMPTY if isinstance(text, str) else NOT_A_STRING)
            continue
        stats.documents += 1
        stats.bytes += len(text.encode("utf-8"))
        pending.append(text)
        if len(pending) >= batch_size:
            scan(pending)
            pending = []
            if time.perf_counter() - last_log > 10:
                last_log = time.perf_counter()
                log.info("mining: %s, %.1f MB, %d/%d tokens at quota",
                         stats.summary(), stats.bytes / 1e6, len(tokens) - open_tokens, len(tokens))
            if open_tokens == 0:
                break
    if pending and open_tokens:
        scan(pending)
    stats.seconds = time.perf_counter() - start
    return rows, stats
