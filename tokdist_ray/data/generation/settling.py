"""Settling: the samples each token keeps (by the round ledger's cuts) become snippets in Ray
Data, and the snippets are written as parquet parts from the workers.

The snippets come out in a fixed order whatever the passes, actors or blocks: by round, then
by (prompt length, token index) and sample index, the order in which the in-process API
(local.py) produces them, so the API and the job give the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import pyarrow as pa

from tokdist_ray.capacity import cluster_capacity
from tokdist_ray.data.generation.requests import settled_snippets
from tokdist_ray.data.generation.rounds import round_of
from tokdist_ray.data.snippets import SNIPPET_SCHEMA
from tokdist_ray.errors import TokdistError
from tokdist_ray.storage import location
from tokdist_ray.vocab.tokens import NewToken

if TYPE_CHECKING:
    import ray.data

ORDER = ["round", "rank", "sample_index"]  # the snippets' order; rank: the token's (prompt length, index) place


def token_ranks(tokens: dict[int, NewToken], prefix: list[int]) -> dict[int, int]:
    """Each token's place by (prompt length, token index): the order within a round."""
    order = sorted(tokens, key=lambda i: (len(prefix) + len(tokens[i].phrase_ids), i))
    return {index: rank for rank, index in enumerate(order)}


class SnippetSettler:
    """A Ray Data actor: the expanded tokenizer, built once; samples a token keeps (by the
    round ledger's cuts) become snippets with their order keys, the others are left out."""

    def __init__(self, tokenizer, new_start: int, snippet_len: int, cuts: dict[int, list[int]],
                 ranks: dict[int, int]) -> None:
        self.tokenizer, self.new_start, self.snippet_len = tokenizer, new_start, snippet_len
        self.cuts, self.ranks = cuts, ranks

    def __call__(self, batch: pa.Table) -> pa.Table:
        index, sample = batch["token_index"].to_pylist(), batch["sample_index"].to_pylist()
        short = batch["short"].to_pylist()
        keep = [row for row, (i, s, cut_short) in enumerate(zip(index, sample, short))
                if not cut_short and i in self.cuts and s < self.cuts[i][-1]]
        kept = batch.take(pa.array(keep, pa.int64()))
        ks, ki = kept["sample_index"].to_pylist(), kept["token_index"].to_pylist()
        keys = pa.table({"round": pa.array([round_of(self.cuts[i], s) for i, s in zip(ki, ks)], pa.int32()),
                         "rank": pa.array([self.ranks[i] for i in ki], pa.int32())})
        samples = kept.select(["token", "token_index", "input_ids", "phrase_start", "sample_index"])
        samples = samples.append_column("round", keys["round"]).append_column("rank", keys["rank"])
        return settled_snippets(samples, self.tokenizer, self.new_start, self.snippet_len).select(SNIPPET_SCHEMA.names + ORDER)


def settled(passes: list, expansion, snippet_len: int, cuts: dict[int, list[int]], ranks: dict[int, int],
            batch_size: int) -> "ray.data.Dataset | None":
    """The passes' samples the tokens keep, as snippets with their order keys (materialised)."""
    import ray.data

    if not passes:
        return None
    samples = passes[0].union(*passes[1:]) if len(passes) > 1 else passes[0]
    return samples.map_batches(
        SnippetSettler, batch_format="pyarrow", batch_size=max(batch_size, 256),
        fn_constructor_kwargs={"tokenizer": expansion.tokenizer, "new_start": expansion.new_start,
                               "snippet_len": snippet_len, "cuts": cuts, "ranks": ranks},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cluster_capacity().cpu_workers(1)),
    ).materialize()


def write_part(batch: pa.Table, directory: str) -> pa.Table:
    """One parquet part of sorted snippets, named by its first order key, so that the
    parts' sorted paths (the order training reads them in) are the snippets' order."""
    import pyarrow.parquet as pq

    if batch.num_rows == 0:
        return pa.table({"path": pa.array([], pa.string()), "rows": pa.array([], pa.int64()),
                         "first": pa.array([], pa.string()), "last": pa.array([], pa.string())})
    batch = batch.sort_by([(k, "ascending") for k in ORDER])
    first, last = (order_key(batch.slice(i, 1).select(ORDER).to_pylist()[0]) for i in (0, batch.num_rows - 1))
    fs, root = location(directory)
    path = f"{root.rstrip('/')}/part-{first}.parquet"
    pq.write_table(batch.select(SNIPPET_SCHEMA.names).cast(SNIPPET_SCHEMA), path, filesystem=fs)
    return pa.table({"path": [path], "rows": [batch.num_rows], "first": [first], "last": [last]})


def order_key(row: dict) -> str:
    return f"r{row['round']:03d}-t{row['rank']:09d}-s{row['sample_index']:09d}"


@dataclass
class GeneratedSnippets:
    """Generated snippets left in Ray's object store (SNIPPET_SCHEMA columns plus the order
    keys): `write` puts them into parquet parts from the workers, `table` brings them to
    this process (the API, tests); both in the fixed order."""

    dataset: "ray.data.Dataset | None"  # None: nothing was generated
    num_rows: int

    def write(self, directory: str) -> list[str]:
        """Parquet parts under `directory` (made if missing), written by Ray Data; their
        sorted paths hold the snippets in order. Returns the paths, in that order."""
        fs, root = location(directory)
        fs.create_dir(root, recursive=True)
        if self.num_rows == 0:
            return []
        parts = self.dataset.sort(ORDER).map_batches(partial(write_part, directory=directory), batch_size=None,
                                                     batch_format="pyarrow").materialize()
        files = sorted((row for row in parts.iter_rows()), key=lambda row: row["first"])
        for before, after in zip(files, files[1:]):
            if before["last"] >= after["first"]:  # Ray Data handed one call two sort ranges: the order would break
                raise TokdistError(f"generated snippet parts overlap ({before['path']}, {after['path']}); "
                                   "this is a bug, please report it")
        if sum(row["rows"] for row in files) != self.num_rows:
            raise TokdistError(f"wrote {sum(row['rows'] for row in files)} generated snippets, expected {self.num_rows}")
        return [row["path"] for row in files]

    def table(self) -> pa.Table:
        import ray

        tables = [t for t in ray.get(self.dataset.to_arrow_refs()) if t.num_rows] if self.dataset is not None else []
        if not tables:
            return SNIPPET_SCHEMA.empty_table()
        table = pa.concat_tables(tables).sort_by([(k, "ascending") for k in ORDER])
        return table.select(SNIPPET_SCHEMA.names).cast(SNIPPET_SCHEMA)
