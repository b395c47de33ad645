"""CPU snippet generation throughput on SmolLM2-135M: in-process vs the Ray Data actor pool.

Rows, all on the same tokens and settings, in one run:
  - in-process, one token per batch (the layout of the earlier per-token loop)
  - in-process, prompts of several tokens batched together with left padding
  - Ray Data actor pool, 1 actor with all cores, and 2 actors with one core each
    (wall time of the whole stage: actor start and model load included)
  - the Ray Data stage for a single snippet: its fixed cost
Each configuration runs `--repeats` times and the best time counts, because this machine
is shared and noisy; the load average is printed with the table.

    python bench/bench_generation.py --tokens 4 --per-token 8 --snippet-len 32

Results, `--tokens 4 --per-token 8 --snippet-len 16 --batch-size 32 --repeats 2`, 2-core
machine shared with other jobs (load average 2 to 23 over the runs, so absolute numbers
swing by 8x between runs; read the ratios):

    run 1, 2026-11-29 08:40, load 9 -> 23 (1 block for 2 actors: fixed since)
    | configuration                              | snippets | seconds | snippets/s | vs batched |
    | in-process, one token per batch            |       32 |    81.0 |       0.39 |      0.12x |
    | in-process, tokens batched together        |       32 |    10.0 |       3.19 |      1.00x |
    | Ray Data, 1 actor x 2 CPUs                 |       32 |    81.1 |       0.39 |      0.12x |
    | Ray Data, 2 actors x 1 CPU                 |       32 |    55.1 |       0.58 |      0.18x |
    | Ray Data, 2 actors, 1 snippet (fixed cost) |        1 |    56.2 |       0.02 |      0.01x |

    run 2, 2026-11-29 09:05, load 9 -> 14 -> 7
    | in-process, one token per batch            |       32 |   433.3 |       0.07 |      0.19x |
    | in-process, tokens batched together        |       32 |    82.1 |       0.39 |      1.00x |
    | Ray Data, 1 actor x 2 CPUs                 |       32 |    50.8 |       0.63 |      1.62x |
    | Ray Data, 2 actors x 1 CPU                 |       32 |    35.0 |       0.91 |      2.34x |
    | Ray Data, 2 actors, 1 snippet (fixed cost) |        1 |    27.5 |       0.04 |      0.09x |

    run 3, 2026-11-29 09:48, load 2 -> 5 (the quietest)
    | in-process, one token per batch            |       32 |    97.4 |       0.33 |      0.17x |
    | in-process, tokens batched together        |       32 |    16.6 |       1.92 |      1.00x |
    | Ray Data, 1 actor x 2 CPUs                 |       32 |    34.6 |       0.93 |      0.48x |
    | Ray Data, 2 actors x 1 CPU                 |       32 |    33.8 |       0.95 |      0.49x |
    | Ray Data, 2 actors, 1 snippet (fixed cost) |        1 |    29.1 |       0.03 |      0.02x |

What holds in all three: batching prompts of several tokens is 5-8x faster than one token per
batch; a Ray Data stage costs 30-55 s before its first snippet here (worker start, torch
import, model load), so a small run is faster in-process; one-thread actors hold up far
better than one two-thread process when the cores are oversubscribed (OpenMP threads spin).

Since snippets hold the expanded tokenizer's ids (`expand_with_merges`), a sample in which
that tokenizer does not emit the token (the model glued more letters on to the word) is
dropped after generation; "snippets" counts the kept ones, "dropped" the others. The tokens
are the first `--tokens` words; the intermediate merge tokens they need get no samples here.
"""

from __future__ import annotations

import argparse
import os
import time

import ray
import torch

from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.data.generation.local import generate_snippets
from tokdist_ray.data.generation.ray_backend import generate_snippet_table
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import load_model, load_tokenizer, resolve_model_path

MODEL = "bundled:smollm2"
WORDS = [" Krankenwagen", " Schmetterling", " Donaudampfschiff", " Quetzalcoatl", " Eichhörnchen",
         " Streichholzschachtel", " Zugspitze", " Rindfleisch"]


def best_of(repeats: int, run) -> tuple[int, int, float]:
    """(snippets, dropped samples, best seconds) over `repeats` runs."""
    results = [run() for _ in range(repeats)]
    return results[0][0], results[0][1], min(seconds for *_, seconds in results)


def timed(fn) -> tuple[int, int, float]:
    start = time.perf_counter()
    count, dropped = fn()
    return count, dropped, time.perf_counter() - start


def in_process(model, expansion, tokens, args, batch_size: int):
    source = GeneratedDataSource(min_new_tokens=1, batch_size=batch_size)

    def run():
        rows, stats = generate_snippets(model, expansion, tokens, args.snippet_len, args.per_token, source)
        return len(rows), stats.dropped_not_emitted

    return lambda: timed(run)


def ray_pool(expansion, tokens, args, actors: int, per_token: int | None = None):
    source = GeneratedDataSource(min_new_tokens=1, batch_size=args.batch_size, backend="transformers",
                                 concurrency=actors, num_cpus_per_actor=args.cpus / actors)
    count = per_token or args.per_token

    def run():
        table, stats = generate_snippet_table(MODEL, expansion, tokens, args.snippet_len, count, source)
        return table.num_rows, stats.dropped_not_emitted

    return lambda: timed(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--per-token", type=int, default=8)
    parser.add_argument("--snippet-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    resolve_model_path(MODEL)  # materialise once, outside every timing
    tokenizer = load_tokenizer(MODEL)
    model = load_model(MODEL)
    expansion = expand_with_merges(tokenizer, WORDS)
    tokens = expansion.requested[: args.tokens]  # ids new_start, new_start + 1, ...: the default token_indices
    print(f"{len(tokens)} tokens x {args.per_token} snippets, snippet_len {args.snippet_len}, "
          f"batch {args.batch_size}, torch threads in-process {torch.get_num_threads()}, load {os.getloadavg()}")

    rows = [
        ("in-process, one token per batch",
         best_of(args.repeats, in_process(model, expansion, tokens, args, args.per_token))),
        ("in-process, tokens batched together",
         best_of(args.repeats, in_process(model, expansion, tokens, args, args.batch_size))),
    ]
    pythonpath = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    try:
        rows += [
            (f"Ray Data, 1 actor x {args.cpus} CPUs", best_of(args.repeats, ray_pool(expansion, tokens, args, 1))),
            (f"Ray Data, 2 actors x {args.cpus / 2:g} CPU",
             best_of(args.repeats, ray_pool(expansion, tokens, args, 2))),
            ("Ray Data, 2 actors, 1 snippet (fixed cost)",
             best_of(args.repeats, ray_pool(expansion, tokens[:1], args, 2, 1))),
        ]
    finally:
        ray.shutdown()

    base = rows[1][1][0] / rows[1][1][2]
    print(f"\nload average after: {os.getloadavg()}\n")
    print("| configuration | snippets | dropped (token not emitted) | seconds | snippets/s | vs batched in-process |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (count, dropped, seconds) in rows:
        rate = count / seconds
        print(f"| {name} | {count} | {dropped} | {seconds:.1f} | {rate:.2f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
