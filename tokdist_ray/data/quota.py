"""The quota ledger: which mined snippets a run keeps, shared by the Ray miners' driver
(mining.py) and the in-process miner (local_mining.py), so both keep the same ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import pyarrow as pa

from tokdist_ray.data.snippets import SNIPPET_SCHEMA, snippet_row

if TYPE_CHECKING:
    from tokdist_ray.vocab.tokens import NewToken


@dataclass
class QuotaLedger:
    """Each new token's first `quota` distinct snippets in stream order.

    A snippet is taken for its main token, the one it was cut around. With
    `count_bystanders` it also counts toward the quota of every other new token it holds:
    training merges them all and fits their rows on it too, and with thousands of new
    tokens most snippets hold several, so a frequent token fills from other tokens'
    snippets and stops costing snippets of its own. Without it only main tokens count, as
    in the reference."""

    tokens: Sequence[NewToken]
    quota: int
    new_start: int  # id of tokens[0]; tokens[i] is new_start + i
    count_bystanders: bool = True
    rows: list[list[dict]] = field(init=False)  # per token index, the snippets taken for it, in order
    seen: list[set] = field(init=False)  # per token index, the distinct snippets counted toward its quota
    open: int = field(init=False)  # tokens still short of the quota

    def __post_init__(self):
        self.rows = [[] for _ in self.tokens]
        self.seen = [set() for _ in self.tokens]
        self.open = len(self.tokens) if self.quota > 0 else 0

    def full(self, index: int) -> bool:
        return len(self.seen[index]) >= self.quota

    def offer(self, index: int, ids: list[int], token_position: int, source: str = "corpus") -> list[int]:
        """Take the snippet for token `index` if it has room and has not counted the
        snippet yet; the indices of the tokens this fills."""
        key = tuple(ids)
        if self.full(index) or key in self.seen[index]:
            return []
        self.rows[index].append(snippet_row(self.tokens[index], index, ids, token_position, source))
        filled = [index] if self._count(index, key) else []
        if self.count_bystanders:
            last = self.new_start + len(self.tokens)
            bystanders = {i - self.new_start for i in ids if self.new_start <= i < last} - {index}
            filled += [j for j in sorted(bystanders) if self._count(j, key)]
        return filled

    def _count(self, index: int, key: tuple) -> bool:
        """Count a snippet toward token `index`'s quota, once; True if that fills it."""
        if self.full(index) or key in self.seen[index]:
            return False
        self.seen[index].add(key)
        if self.full(index):
            self.open -= 1
            return True
        return False

    def counts(self) -> dict[str, int]:
        """token -> snippets counted toward its quota."""
        return {t.text: len(seen) for t, seen in zip(self.tokens, self.seen)}

    def taken(self) -> list[dict]:
        """The snippets taken, grouped by main token."""
        return [row for rows in self.rows for row in rows]

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.taken(), schema=SNIPPET_SCHEMA)
