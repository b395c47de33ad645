"""The quota ledger: which mined snippets a run keeps, shared by the Ray miners' driver
and the in-process miner (mining.py, local_mining.py), so both keep the same ones.

It holds no Python object per snippet: the taken snippets' ids, main tokens and positions
sit in flat int32 arrays (about 0.2 KB a snippet of 50 ids, not the 2.2 KB of a row
dict), and each token's seen set keeps a 64-bit hash of a snippet, not its ids (a hash
collision only drops a distinct snippet, which is safe)."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokdist_ray.data.snippets import SNIPPET_SCHEMA

if TYPE_CHECKING:
    from tokdist_ray.vocab.tokens import NewToken


@dataclass
class QuotaLedger:
    """Each new token's first `quota` distinct snippets in stream order (`quota`: one
    number for every token, or one per token in token order: data.budget).

    A snippet is taken for its main token, the one it was cut around. With
    `count_bystanders` it also counts toward the quota of every other new token it holds:
    training merges them all and fits their rows on it too, and with thousands of new
    tokens most snippets hold several, so a frequent token fills from other tokens'
    snippets and stops costing snippets of its own. Without it only main tokens count, as
    in the reference."""

    tokens: Sequence[NewToken]
    quota: int | Sequence[int]
    new_start: int  # id of tokens[0]; tokens[i] is new_start + i
    count_bystanders: bool = True
    seen: list[set[int]] = field(init=False)  # per token index, hashes of the snippets counted toward its quota
    open: int = field(init=False)  # tokens still short of the quota
    # the snippets taken, in the order taken: main token, position of its id, ids (flat, with offsets)
    _main: array = field(init=False, repr=False)
    _position: array = field(init=False, repr=False)
    _ids: array = field(init=False, repr=False)
    _offsets: array = field(init=False, repr=False)

    def __post_init__(self):
        self.seen = [set() for _ in self.tokens]
        self._quotas = [self.quota] * len(self.tokens) if isinstance(self.quota, int) else list(self.quota)
        if len(self._quotas) != len(self.tokens):
            raise ValueError(f"{len(self._quotas)} quotas for {len(self.tokens)} tokens")
        self.open = sum(q > 0 for q in self._quotas)
        self._main, self._position, self._ids = array("i"), array("i"), array("i")
        self._offsets = array("q", [0])

    def full(self, index: int) -> bool:
        return len(self.seen[index]) >= self._quotas[index]

    def offer(self, index: int, ids: Sequence[int], token_position: int) -> list[int]:
        """Take the snippet for token `index` if it has room and has not counted the
        snippet yet; the indices of the tokens this fills."""
        key = hash(tuple(ids))
        if self.full(index) or key in self.seen[index]:
            return []
        self._main.append(index)
        self._position.append(token_position)
        self._ids.extend(ids)
        self._offsets.append(len(self._ids))
        filled = [index] if self._count(index, key) else []
        if self.count_bystanders:
            last = self.new_start + len(self.tokens)
            bystanders = {i - self.new_start for i in ids if self.new_start <= i < last} - {index}
            filled += [j for j in sorted(bystanders) if self._count(j, key)]
        return filled

    def _count(self, index: int, key: int) -> bool:
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

    def table(self) -> pa.Table:
        """The snippets taken (SNIPPET_SCHEMA), grouped by main token, in the order taken."""
        main = pa.array(np.frombuffer(self._main, np.int32), pa.int32())
        ids = pa.ListArray.from_arrays(pa.array(np.frombuffer(self._offsets, np.int64).astype(np.int32)),
                                       pa.array(np.frombuffer(self._ids, np.int32), pa.int32()))
        table = pa.Table.from_arrays(
            [pa.array([t.text for t in self.tokens], pa.string()).take(main), main, ids,
             pa.array(np.frombuffer(self._position, np.int32), pa.int32()), pa.repeat("corpus", len(main))],
            schema=SNIPPET_SCHEMA)
        return table.take(pc.sort_indices(main))  # a stable sort: each token's snippets keep their order

    def taken(self) -> list[dict]:
        """The snippets taken as rows (held-out evaluation's few thousand)."""
        return self.table().to_pylist()
