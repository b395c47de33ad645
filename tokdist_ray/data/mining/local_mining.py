"""The in-process corpus miner: the API's path when no Ray cluster is running, and the
held-out evaluation's. The Ray miners' scanner (matching.TokenScanner: only the text
around surface matches is tokenised, so one huge document costs no more memory than its
regions) and quota ledger, without Ray."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Iterable

from tokdist_ray.data.corpus.files import EMPTY, NOT_A_STRING, BadRow
from tokdist_ray.data.mining.matching import TokenScanner
from tokdist_ray.data.mining.quota import QuotaLedger
from tokdist_ray.data.snippets import MiningStats, bos_prefix

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
    text_column: str = "text",
) -> tuple[list[dict], MiningStats]:
    """Collect up to `snippets_per_token` distinct snippets per token, in corpus order,
    stopping as soon as every token has its quota (`count_bystanders`: a snippet counts
    toward every new token it holds, see QuotaLedger). Snippets hold the expanded
    tokenizer's ids. `text_column` only words the error when no row had text."""
    tokens, new_start = expansion.tokens, expansion.new_start
    scanner = TokenScanner(expansion.tokenizer.backend_tokenizer, [t.text for t in tokens], new_start, snippet_len)
    prefix = bos_prefix(expansion.tokenizer)
    stats = MiningStats()
    ledger = QuotaLedger(tokens, snippets_per_token, new_start, count_bystanders)
    start, last_log = time.perf_counter(), time.perf_counter()

    def scan(texts: list[str]) -> None:
        open_tokens = [i for i in range(len(tokens)) if not ledger.full(i)]
        for hit in scanner.scan(texts, open_tokens, snippets_per_token):
            ledger.offer(hit.token_index, prefix + hit.window, len(prefix) + hit.token_position)

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
    stats.require_text(text_column)
    stats.seconds = time.perf_counter() - start
    stats.counts = ledger.counts()
    return ledger.taken(), stats
