"""The mining actors' side: a Ray Data UDF (SnippetMiner) that turns batches of documents
into candidate snippets plus one tally row, the tokenizer it is shipped (TokenizerSpec),
and the QuotaBoard through which the driver tells miners which tokens are full.

This module is imported by every mining actor: it keeps transformers and torch out.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from tokdist_ray.data.budget import quota_at
from tokdist_ray.data.corpus.corpus_parts import BAD, TEXT
from tokdist_ray.data.corpus.files import EMPTY
from tokdist_ray.data.corpus.ray_corpus import PART
from tokdist_ray.data.mining.matching import TokenScanner
from tokdist_ray.fingerprint import fingerprint

TALLY = -1  # token_index of a miner's per-batch tally row

MINED_SCHEMA = pa.schema(
    [
        ("token_index", pa.int32()),  # TALLY for the tally row
        ("input_ids", pa.list_(pa.int32())),
        ("token_position", pa.int32()),
        ("documents", pa.int64()),  # tally row only, as the rest
        ("bad_rows", pa.int64()),
        ("bad_reasons", pa.string()),  # JSON {reason: rows}
        ("bytes", pa.int64()),
        ("tokenised_chars", pa.int64()),
        ("cpu_seconds", pa.float64()),
        ("phase_seconds", pa.string()),  # JSON {scanner phase: CPU seconds}
        ("node", pa.string()),
    ]
)


@dataclass(frozen=True)
class TokenizerSpec:
    """What a miner needs of a tokenizer, shipped by value (no shared filesystem)."""

    definition: str  # tokenizers JSON
    bos: tuple[int, ...]  # [BOS] or () for BOS-less tokenizers

    @classmethod
    def of(cls, tokenizer) -> TokenizerSpec:
        """From a loaded HF fast tokenizer or anything `load_tokenizer` accepts."""
        if isinstance(tokenizer, (str, os.PathLike)):
            from tokdist_ray.vocab.models import load_tokenizer

            tokenizer = load_tokenizer(str(tokenizer))
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("corpus mining on Ray needs a fast (Rust) tokenizer; use mine_snippets for slow ones")
        bos = () if tokenizer.bos_token_id is None else (tokenizer.bos_token_id,)
        return cls(tokenizer.backend_tokenizer.to_str(), bos)

    def fingerprint(self) -> str:
        return fingerprint([self.definition, self.bos], length=64)

    def load(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.definition)


class QuotaBoard:
    """Tokens already full at the driver, so miners stop looking for them. A named actor,
    started only once a token fills: a run where none does starts no extra process."""

    def __init__(self):
        self._full: set[int] = set()

    def mark_full(self, indices: list[int]) -> None:
        self._full.update(indices)

    def full(self) -> list[int]:
        return sorted(self._full)


class BoardReader:
    """A miner's view of the board: asks without waiting, and uses the answer at the next
    batch, so neither the board's start nor a round trip ever holds up mining."""

    def __init__(self, name: str | None):
        self._name, self._board, self._pending = name, None, None
        self.full: list[int] = []

    def refresh(self) -> list[int]:
        import ray

        if self._pending is not None and ray.wait([self._pending], timeout=0)[0]:
            self.full, self._pending = ray.get(self._pending), None
        if self._pending is None and self._find():
            self._pending = self._board.full.remote()
        return self.full

    def _find(self) -> bool:
        import ray

        if self._board is None and self._name is not None:
            try:
                self._board = ray.get_actor(self._name)
            except ValueError:  # no token is full yet
                pass
        return self._board is not None


def _bad_reasons(bad: pa.ChunkedArray, empty: int) -> dict[str, int]:
    """Rows without text by reason (counted in Arrow: the column is mostly null), and the
    whitespace-only texts as "empty"."""
    reasons = {item["values"]: item["counts"] for item in pc.value_counts(bad.drop_null()).to_pylist()}
    return {**reasons, EMPTY: empty} if empty else reasons


@dataclass
class _Passed:
    """What one miner passed on for one token: hashes of its distinct windows (a hash
    collision only undercounts, which is safe) and the latest part they came from."""

    windows: set[int] = field(default_factory=set)
    last_part: int = -1


class SnippetMiner:
    """Ray Data UDF: a batch of documents -> candidate snippets plus one tally row."""

    def __init__(self, tokenizer: TokenizerSpec, texts, new_start: int, snippet_len: int, quota: int | Sequence[int],
                 board: str | None = None):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one CPU per miner
        import ray

        self._scanner = TokenScanner(tokenizer.load(), texts, new_start, snippet_len)
        self._bos = list(tokenizer.bos)
        self._quota = quota  # one for every token, or one per token index (data.budget)
        self._board = BoardReader(board)
        self._all = frozenset(range(len(texts)))
        self._passed: dict[int, _Passed] = {}
        self._full_after: dict[int, int] = {}  # token -> part after which this miner alone filled it
        self._node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def __call__(self, batch: pa.Table) -> pa.Table:
        cpu, chars_before = time.process_time(), self._scanner.tokenised_chars
        phases_before = dict(self._scanner.phase_seconds)
        texts, parts = batch[TEXT].to_pylist(), batch[PART].to_pylist()
        good = [(text, part) for text, part in zip(texts, parts) if text is not None and text.strip()]
        docs = [text for text, _ in good]
        empty = len(texts) - batch[TEXT].null_count - len(docs)
        hits = self._scanner.scan(docs, self._open(min(parts, default=0)), self._quota)
        rows = self._rows(hits, [part for _, part in good])
        tally = {
            "token_index": TALLY, "input_ids": [], "token_position": -1, "documents": len(docs),
            "bad_rows": batch.num_rows - len(docs), "bad_reasons": json.dumps(_bad_reasons(batch[BAD], empty)),
            "bytes": sum(len(d.encode("utf-8")) for d in docs),
            "tokenised_chars": self._scanner.tokenised_chars - chars_before,
            "cpu_seconds": time.process_time() - cpu, "node": self._node,
            "phase_seconds": json.dumps({k: v - phases_before[k] for k, v in self._scanner.phase_seconds.items()}),
        }
        return pa.Table.from_pylist(rows + [tally], schema=MINED_SCHEMA)

    def _open(self, first_part: int) -> frozenset[int]:
        """Tokens still wanted from parts >= first_part."""
        full_here = [t for t, part in self._full_after.items() if part < first_part]
        return self._all.difference(self._board.refresh(), full_here)

    def _rows(self, hits, doc_parts: list[int]) -> list[dict]:
        """Snippets of the hits: per token, the first `quota` distinct ones of this batch
        (what the scanner returns with a quota)."""
        rows = []
        for hit in hits:
            snippet = self._bos + hit.window
            rows.append({"token_index": hit.token_index, "input_ids": snippet,
                         "token_position": len(self._bos) + hit.token_position})
            self._note_passed(hit.token_index, tuple(snippet), doc_parts[hit.doc])
        return rows

    def _note_passed(self, index: int, snippet: tuple, part: int) -> None:
        if index in self._full_after:
            return
        passed = self._passed.setdefault(index, _Passed())
        passed.windows.add(hash(snippet))
        passed.last_part = max(passed.last_part, part)
        if len(passed.windows) >= quota_at(self._quota, index):
            self._full_after[index] = passed.last_part
            del self._passed[index]
