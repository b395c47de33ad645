"""Which snippets each worker trains at each step of a distributed run.

Every worker reads the snippet ids (kilobytes per token, small next to the model) and
walks the same seeded epoch order as the single-process loop: global batch k of an epoch
is `order[k*G:(k+1)*G]`, cut into one contiguous slice per rank. So the global batches
match `train_local` with batch size G, and the data position is the step number alone:
a restarted worker continues at the exact snippet where its checkpoint left off.

(Ray Data's `get_dataset_shard` hands out blocks dynamically; it could give neither
the same batches as the single-process loop nor an exact resume position.)
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache
from dataclasses import dataclass, field
from typing import Sequence

import pyarrow.fs
import pyarrow.parquet as pq

from tokdist_ray.storage import location

from tokdist_ray.training.local import epoch_order


@dataclass
class SnippetSet:
    """Snippet ids in a fixed order (sorted file path, then row), and counts per token."""

    ids: list[list[int]]
    counts: dict[str, int] = field(default_factory=dict)


def parquet_files(fs: pyarrow.fs.FileSystem, root: str) -> list[str]:
    info = fs.get_file_info(root)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"snippets path {root!r} does not exist")
    if info.type == pyarrow.fs.FileType.File:
        return [root]
    found = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    files = sorted(f.path for f in found if f.type == pyarrow.fs.FileType.File and f.path.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no .parquet files under snippets path {root!r}")
    return files


def read_snippets(path: str, token_texts: Sequence[str], filesystem: pyarrow.fs.FileSystem | None = None) -> SnippetSet:
    """The snippets of the given new tokens (rows of other tokens are left out)."""
    fs, root = location(path, filesystem)
    wanted = set(token_texts)
    ids: list[list[int]] = []
    counts: Counter = Counter()
    for file in parquet_files(fs, root):
        table = pq.read_table(file, filesystem=fs, columns=["token", "input_ids"])
        for token, snippet in zip(table.column("token").to_pylist(), table.column("input_ids").to_pylist()):
            if token in wanted:
                ids.append(snippet)
                counts[token] += 1
    return SnippetSet(ids, dict(counts))


@lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(epoch_order(n, seed, epoch))


@dataclass(frozen=True)
class SnippetSchedule:
    """Maps a global step to the snippets of each rank."""

    n_snippets: int
    global_batch: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_snippets / self.global_batch)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a 0-based step."""
        return divmod(step, self.batches_per_epoch)

    def global_indices(self, step: int) -> list[int]:
        epoch, batch = self.position(step)
        order = _epoch_order(self.n_snippets, self.seed, epoch)
        return list(order[batch * self.global_batch : (batch + 1) * self.global_batch])

    def rank_indices(self, step: int, rank: int, world: int) -> list[int]:
        """This rank's contiguous slice of the global batch; slices differ in size by at
        most one, and a rank gets none when a short last batch has fewer snippets than ranks."""
        batch = self.global_indices(step)
        size, extra = divmod(len(batch), world)
        start = rank * size + min(rank, extra)
        return list(batch[start : start + size + (rank < extra)])
