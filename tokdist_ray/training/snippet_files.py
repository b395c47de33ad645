"""Reading a run's snippets from parquet (local or object storage) on every worker.

Every worker reads the snippet ids as one Arrow list array (4 bytes per id, no Python
object per snippet: about 0.2 KB a snippet of 50 ids), walks the seeded schedule (schedule.SnippetSchedule). Ray Data's `get_dataset_shard`
hands out blocks dynamically; it could give neither the same batches as the
single-process loop nor an exact resume position.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq

from tokdist_ray.errors import CorpusNotFoundError
from tokdist_ray.storage import location

SNIPPET_COLUMNS = pa.schema([("token", pa.string()), ("input_ids", pa.list_(pa.int32())), ("source", pa.string())])


@dataclass
class SnippetSet:
    """Snippet ids in a fixed order (sorted file path, then row), and counts per token."""

    ids: pa.ListArray  # int32 ids; indexed per batch (loop.SnippetIds)
    token: pa.Array  # the new token each snippet is for
    source: pa.Array  # "corpus" | "generated"
    counts: dict[str, int] = field(default_factory=dict)

    def corpus_windows(self, per_token: int) -> list[list[int]]:
        return corpus_windows(self.token, self.ids, self.source, per_token)


def corpus_windows(token: pa.Array, ids: pa.Array, source: pa.Array, per_token: int) -> list[list[int]]:
    """The ids of up to `per_token` snippets of each token that were mined from the corpus:
    windows of its text (a generated snippet is written around its token, not text as it
    comes). In one order whatever the order of the rows (by token, then ids), so the job's
    files and the API's table give the fit the same windows in the same passes."""
    names, windows = token.to_pylist(), ids.to_pylist()
    mined = [i for i, where in enumerate(source.to_pylist()) if where == "corpus"]
    taken: Counter[str] = Counter()
    out = []
    for i in sorted(mined, key=lambda i: (names[i], windows[i])):
        if taken[names[i]] < per_token:
            taken[names[i]] += 1
            out.append(windows[i])
    return out


def parquet_files(fs: pyarrow.fs.FileSystem, root: str) -> list[str]:
    info = fs.get_file_info(root)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise CorpusNotFoundError(
            f"snippets path {root!r} does not exist on {socket.gethostname()}; run the snippets stage first or fix "
            "the path (on a cluster, run_dir must be on a filesystem every node mounts at the same path)")
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
    wanted = pa.array(sorted(set(token_texts)), pa.string())
    tables = []
    for file in parquet_files(fs, root):
        table = pq.read_table(file, filesystem=fs, columns=["token", "input_ids", "source"])
        tables.append(table.filter(pc.is_in(table["token"], wanted)).cast(SNIPPET_COLUMNS))
    table = pa.concat_tables(tables).combine_chunks()
    counts = {row["values"]: row["counts"] for row in pc.value_counts(table["token"]).to_pylist()}
    ids = table["input_ids"].chunk(0) if table["input_ids"].num_chunks else pa.array([], pa.list_(pa.int32()))
    token, source = (table[name].chunk(0) if table[name].num_chunks else pa.array([], pa.string())
                     for name in ("token", "source"))
    return SnippetSet(ids, token, source, counts)
