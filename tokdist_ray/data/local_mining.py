"""The in-process corpus miner: the API's path when no Ray cluster is running, and the
held-out evaluation's. Same windows as the Ray miners (mining.py), without Ray."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Iterable

from tokdist_ray.data.files import EMPTY, NOT_A_STRING, BadRow
from tokdist_ray.data.quota import QuotaLedger
from tokdist_ray.data.snippets import MiningStats, bos_prefix, settle, window_around

if TYPE_CHECKING:
    from tokdist_ray.vocab.merges import MergeExpansion

log = logging.getLogger("tokdist_ray")


def mine_snippets(
    documents: Iterable[Any],
    expansion: MergeExpansion,
    snippet_len: int = 50,
    snippets_per_token: int = 100,
    batch_size: int = 256,
    count_bystanders: bool = True,
) -> tuple[list[dict], MiningStats]:
    """Collect up to `snippets_per_token` distinct snippets per token, in corpus order,
    stopping as soon as every token has its quota (`count_bystanders`: a snippet counts
    toward every new token it holds, see QuotaLedger). Snippets hold the expanded
    tokenizer's ids."""
    tokenizer, tokens, new_start = expansion.tokenizer, expansion.tokens, expansion.new_start
    backend = tokenizer.backend_tokenizer
    prefix = bos_prefix(tokenizer)
    stats = MiningStats()
    ledger = QuotaLedger(tokens, snippets_per_token, new_start, count_bystanders)
    start, last_log = time.perf_counter(), time.perf_counter()

    def scan(texts: list[str]) -> None:
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            for pos, token_id in enumerate(ids):
                if token_id < new_start or ledger.full(token_id - new_start):
                    continue
                settled = settle(backend, *window_around(ids, pos, 1, snippet_len))
                if settled is not None:
                    window, offset = settled
                    ledger.offer(token_id - new_start, prefix + window, len(prefix) + offset)

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
                         stats.summary(), stats.bytes / 1e6, len(tokens) - ledger.open, len(tokens))
            if ledger.open == 0:
                break
    if pending and ledger.open:
        scan(pending)
    stats.seconds = time.perf_counter() - start
    stats.counts = ledger.counts()
    return ledger.taken(), stats
