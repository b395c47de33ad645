"""Reading a run's snippets from parquet (local or object storage) on every worker.

Every worker reads the snippet ids (kilobytes per token, small next to the model) and
walks the seeded schedule (schedule.SnippetSchedule). Ray Data's `get_dataset_shard`
hands out blocks dynamically; it could give neither the same batches as the
single-process loop nor an exact resume position.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import pyarrow.fs
import pyarrow.parquet as pq

from tokdist_ray.errors import CorpusNotFoundError
from tokdist_ray.storage import location


@dataclass
class SnippetSet:
    """Snippet ids in a fixed order (sorted file path, then row), and counts per token."""

    ids: list[list[int]]
    counts: dict[str, int] = field(default_factory=dict)


def parquet_files(fs: pyarrow.fs.FileSystem, root: str) -> list[str]:
    info = fs.get_file_info(root)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise CorpusNotFoundError(f"snippets path {root!r} does not exist; run the snippets stage first or fix the path")
    if info.type == pyarrow.fs.FileType.File:
        return [root]
    found = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    files = sorted(f.path for f in found if f.type == pyarrow.fs.FileType.File and f.path.endswith(".parquet"))
    if not files:
        raise CorpusNotFoundError(f"no .parquet files under snippets path {root!r}; run the snippets stage first or fix the path")
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
