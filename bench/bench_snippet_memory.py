"""Memory per snippet where snippets are held: a training worker (Arrow list array against
Python lists) and the mining driver's quota ledger (flat arrays and hashes against the row
dicts and id tuples it held before), side by side in one run.

    python bench/bench_snippet_memory.py --snippets 200000 --tokens 2000
"""

from __future__ import annotations

import argparse
import gc

import numpy as np
import psutil
import pyarrow as pa

from tokdist_ray.data.mining.quota import QuotaLedger
from tokdist_ray.vocab.tokens import NewToken

NEW_START = 49152  # SmolLM2's vocabulary size


def resident() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def row_dict_ledger(tokens, offers) -> list:
    """The ledger's former layout: a row dict per snippet and its ids as a tuple in a seen set."""
    rows, seen = [[] for _ in tokens], [set() for _ in tokens]
    for index, ids in offers:
        key = tuple(ids)
        if key not in seen[index]:
            seen[index].add(key)
            rows[index].append({"token": tokens[index].text, "token_index": index, "input_ids": ids,
                                "token_position": 1, "source": "corpus"})
    return [rows, seen]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--snippets", type=int, default=200_000)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--snippet-len", type=int, default=51)  # the job's default snippet_len + BOS
    args = parser.parse_args()
    n, length = args.snippets, args.snippet_len
    ids = np.random.default_rng(0).integers(0, NEW_START, size=(n, length), dtype=np.int32)
    tokens = [NewToken(f" t{i}", (1, 2)) for i in range(args.tokens)]

    base = resident()
    arrow = pa.ListArray.from_arrays(pa.array(np.arange(0, n * length + 1, length, dtype=np.int32)), pa.array(ids.ravel()))
    arrow_bytes = resident() - base
    lists = arrow.to_pylist()
    list_bytes = resident() - base - arrow_bytes
    del lists

    base = resident()
    held = row_dict_ledger(tokens, ((k % len(tokens), ids[k].tolist()) for k in range(n)))
    dict_bytes = resident() - base
    del held
    base = resident()
    ledger = QuotaLedger(tokens, n // len(tokens) + 1, NEW_START)
    for k in range(n):
        ledger.offer(k % len(tokens), ids[k].tolist(), 1)
    ledger_bytes = resident() - base

    print(f"{n} snippets of {length} ids, {len(tokens)} tokens; resident bytes per snippet")
    print(f"worker  Python lists {list_bytes / n:8.0f}   Arrow list array {arrow_bytes / n:8.0f}")
    print(f"ledger  row dicts    {dict_bytes / n:8.0f}   flat arrays      {ledger_bytes / n:8.0f}")


if __name__ == "__main__":
    main()
