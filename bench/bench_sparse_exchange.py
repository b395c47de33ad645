"""Bytes per DDP step of the new rows' gradient: DDP's own dense all-reduce against the
exchange of the touched rows only (tokdist_ray/training/sparse_exchange.py).

Two gloo processes each hold the `[rows, width]` fp32 gradient of the new rows that their
half of a global batch gives: nonzero at the rows of the new ids in their snippets, as an
embedding lookup leaves it. Each exchanges it, taking turns so machine noise hits both
alike, with torch's `allreduce_hook` (DDP's default exchange, written in Python: divide,
then all-reduce the bucket) and with `sparse_rows_hook`, handed the gradient as DDP hands
a bucket (a table this size is a bucket of its own). The bytes are those of the tensors
each hook passes to `all_reduce`, recorded as it sends them; the seconds are the median
of `--steps` exchanges after a warm-up, each from the same gradient.

The batch, an assumption: each snippet holds its own token once (every token gets the
same quota of snippets, so uniform over the rows) and a share of its other positions are
new ids drawn Zipf-like (weight 1/rank^s) over the rows. Shares: 2.9 new ids in 33
positions, measured at 2,000 tokens (bench/README.md, "Batch grouping"), and 8 in 33,
the guess of the 30,000-token cost model (used for any other row count too). "every row"
is a gradient on every row (tied rows under the new-token output loss or CE), where the
hook sends the flags and then falls back to `allreduce_hook`.

    python bench/bench_sparse_exchange.py                 # d 4,096, 2,000 and 30,000 rows
    python bench/bench_sparse_exchange.py --width 512     # lighter
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokdist_ray.training.sparse_exchange import sparse_rows_hook  # noqa: E402

WORLD = 2
NEW_SHARE = {2_000: 2.9 / 33, 30_000: 8 / 33}  # new ids per position (see the docstring)


class Bucket:
    """What a DDP comm hook reads of a bucket holding one table."""

    def __init__(self, buffer: torch.Tensor):
        self._buffer = buffer

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def gradients(self) -> list[torch.Tensor]:
        return [self._buffer]


def rank_gradient(rows: int, width: int, ids: torch.Tensor | None, seed: int) -> torch.Tensor:
    """Random values at the rows of `ids`; at every row when `ids` is None."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.zeros(rows, width)
    touched = torch.arange(rows) if ids is None else ids.unique()
    grad[touched] = torch.randn(len(touched), width, generator=g)
    return grad


def snippet_ids(rows: int, snippets: int, positions: int, share: float, zipf: float, seed: int) -> list[torch.Tensor]:
    """Per snippet, the new-row ids at its positions (see the docstring)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, rows + 1, dtype=torch.float64) ** -zipf
    others = round(share * (positions - 1))
    return [torch.cat([torch.randint(rows, (1,), generator=g), torch.multinomial(weights, others, True, generator=g)])
            for _ in range(snippets)]


@contextlib.contextmanager
def recorded_bytes():
    """Bytes of each tensor all-reduced from Python while the block runs."""
    sent, all_reduce = [], dist.all_reduce

    def recording(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = recording
    try:
        yield sent
    finally:
        dist.all_reduce = all_reduce


def timed_exchanges(grad: torch.Tensor, steps: int) -> dict[str, tuple[float, list[int]]]:
    """Per hook: (median seconds of an exchange, bytes of each tensor it all-reduced)."""
    hooks = {"dense": allreduce_hook, "sparse": sparse_rows_hook}
    times, sent = {name: [] for name in hooks}, {}
    buffer = torch.empty_like(grad)
    for step in range(steps + 1):
        for name in sorted(hooks, reverse=step % 2 == 1):  # alternate which goes first
            buffer.copy_(grad)
            dist.barrier()
            with recorded_bytes() as sent[name]:
                started = time.perf_counter()
                hooks[name](None, Bucket(buffer)).wait()
                times[name].append(time.perf_counter() - started)
    return {name: (statistics.median(times[name][1:]), sent[name]) for name in hooks}


def measure(rank: int, args, directory: str) -> None:
    torch.set_num_threads(1)  # one core per process
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD)
    results = []
    for rows in args.rows:
        for snippets, positions in args.batches:
            batch = snippet_ids(rows, snippets, positions, NEW_SHARE.get(rows, 8 / 33), args.zipf, seed=rows + snippets)
            for every_row in (False, True):
                mine = None if every_row else torch.cat(batch[rank::WORLD])
                grad = rank_gradient(rows, args.width, mine, seed=rank)
                row = {"rows": rows, "batch": f"{snippets} x {positions}",
                       "union": "every row" if every_row else f"{len(torch.cat(batch).unique()):,}"}
                results.append(row | timed_exchanges(grad, args.steps))
                del grad
    if rank == 0:
        print_table(results, args)
    dist.destroy_process_group()


def print_table(results: list[dict], args) -> None:
    mb = 1e6
    print(f"\nwidth {args.width}, fp32 gradients, {WORLD} gloo processes; Zipf s={args.zipf}; "
          f"median of {args.steps} exchanges")
    print("| new rows | global batch (snippets x positions) | rows touched (union) | dense MB/step | "
          "sparse MB/step (flags + rows) | sparse / dense | exchange s, dense | sparse |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        (dense_s, dense_sent), (sparse_s, sparse_sent) = r["dense"], r["sparse"]
        flags, rest = sparse_sent[0], sum(sparse_sent[1:])
        print(f"| {r['rows']:,} | {r['batch']} | {r['union']} | {sum(dense_sent) / mb:.1f} | "
              f"{(flags + rest) / mb:.3f} ({flags / mb:.3f} + {rest / mb:.3f}) | {(flags + rest) / sum(dense_sent):.2%} | "
              f"{dense_s:.3f} | {sparse_s:.3f} |")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    return f"{model}, {os.cpu_count()} cores, Debian {debian}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000, 30_000])
    parser.add_argument("--width", type=int, default=4_096)
    parser.add_argument("--batches", type=lambda s: tuple(map(int, s.split("x"))), nargs="+",
                        default=[(16, 64), (256, 33)], help="global batches as SNIPPETSxPOSITIONS")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(measure, args=(args, directory), nprocs=WORLD)


if __name__ == "__main__":
    main()
