"""Tokenizer benchmark: SmolLM2's tokenizer expanded with 1,000, 10,000 and 30,000 new
tokens, through merges (vocab/merges.py) against Hugging Face added tokens (the
reference's way), side by side in one run.

For each variant: the time to build it, the time to load its saved directory with
AutoTokenizer, encode throughput in MB/s on about 1 MB of the Python docs (one batched
call over the documents), each the median of --rounds rounds in which the variants take
turns, and tokens per KB of that text. A table of ratios follows: these machines are noisy.

Tokens: words of the Python docs sources (python3.11-doc) that SmolLM2 cuts into two or
more pieces, most frequent first, topped up with their capitalised, upper-case and
space-toggled forms where those are cut too. Both modes get the same list.

    python bench/bench_tokenizer.py                       # 1k, 10k, 30k (several minutes)
    python bench/bench_tokenizer.py --sizes 1000 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoTokenizer  # noqa: E402

from tokdist_ray.vocab.merges import ADDED_TOKENS, MERGES, expand_with_merges  # noqa: E402
from tokdist_ray.vocab.models import load_tokenizer  # noqa: E402

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
WORD = re.compile(r" ?[A-Za-z][A-Za-z]+")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_line() -> str:
    """Model name and the flags that matter for tokenizer and bf16 speed, from lscpu."""
    info = dict(
        line.split(":", 1)
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        if ":" in line
    )
    flags = set(info.get("Flags", "").split())
    present = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS)
    return f"CPU: {info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs; {present}"


def docs_texts(limit_bytes: int) -> list[str]:
    """Whole documents of the docs sources, in path order, until `limit_bytes` of UTF-8."""
    texts, size = [], 0
    for path in sorted(DOCS.rglob("*.txt")):
        if size >= limit_bytes:
            break
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1].encode())
    return texts


def split_words(tokenizer, max_tokens: int) -> list[str]:
    """Up to `max_tokens` strings SmolLM2 cuts into several pieces (see the module docstring)."""
    counts = Counter(w for text in docs_texts(1 << 40) for w in WORD.findall(text))
    words = [w for w, _ in counts.most_common()]
    variants = [v for w in words for v in (w.capitalize(), w.upper(), w[1:] if w[0] == " " else " " + w)]
    chosen: dict[str, None] = {}
    for batch in (words, variants):
        encodings = tokenizer.backend_tokenizer.encode_batch(["\n" + w for w in batch], add_special_tokens=False)
        chosen.update((w, None) for w, e in zip(batch, encodings) if len(e.ids) > 2)  # "\n" + two pieces
    if len(chosen) < max_tokens:
        sys.exit(f"only {len(chosen)} multi-piece strings in {DOCS}; ask for fewer tokens")
    return list(chosen)[:max_tokens]


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(directories: list[Path], texts: list[str], rounds: int) -> list[dict]:
    """Per saved tokenizer: median load time, encode MB/s and tokens per KB on `texts`.
    The variants take turns in every round, so load on the machine hits them alike."""
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    loads, encodes = [[] for _ in directories], [[] for _ in directories]
    for _ in range(rounds):
        for i, directory in enumerate(directories):
            loads[i].append(seconds(lambda: AutoTokenizer.from_pretrained(directory)))
            tokenizer = AutoTokenizer.from_pretrained(directory)
            encodes[i].append(seconds(lambda: tokenizer(texts, add_special_tokens=False)))
    results = []
    for directory, load, encode in zip(directories, loads, encodes):
        n_tokens = sum(map(len, AutoTokenizer.from_pretrained(directory)(texts, add_special_tokens=False)["input_ids"]))
        results.append(
            {
                "load_s": statistics.median(load),
                "mb_s": megabytes / statistics.median(encode),
                "tokens_per_kb": n_tokens / (megabytes * 1000),
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 30000])
    parser.add_argument("--megabytes", type=float, default=1.0, help="text for the encode throughput")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    print(cpu_line())
    tokenizer = load_tokenizer("bundled:smollm2")
    texts = docs_texts(int(args.megabytes * 1e6))
    tokens = split_words(tokenizer, max(args.sizes))
    print(f"{len(texts)} documents, {sum(len(t.encode()) for t in texts) / 1e6:.2f} MB; {len(tokens)} candidate tokens")

    with tempfile.TemporaryDirectory() as workdir:
        rows = [{"n": 0, "mode": "original", "new_ids": 0, "build_s": 0.0, "dir": Path(workdir, "original")}]
        tokenizer.save_pretrained(rows[0]["dir"])
        for n in args.sizes:
            for mode in (MERGES, ADDED_TOKENS):
                start = time.perf_counter()
                expansion = expand_with_merges(tokenizer, tokens[:n], mode=mode)
                row = {"n": n, "mode": mode, "new_ids": len(expansion.tokens), "build_s": time.perf_counter() - start}
                row["dir"] = Path(workdir, f"{mode}-{n}")
                expansion.tokenizer.save_pretrained(row["dir"])
                rows.append(row)
                print(
                    f"  {n} {mode}: {row['new_ids']} new ids ({len(expansion.intermediates)} intermediates, "
                    f"{len(expansion.skipped)} skipped) built in {row['build_s']:.1f} s",
                    flush=True,
                )
        for row, result in zip(rows, measure([r["dir"] for r in rows], texts, args.rounds)):
            row.update(result)
    print_tables(rows, args.sizes)


def print_tables(rows: list[dict], sizes: list[int]) -> None:
    print("\n| new tokens | mode | new ids | build s | load s | encode MB/s | tokens/KB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']} | {r['mode']} | {r['new_ids']} | {r['build_s']:.1f} | {r['load_s']:.2f} "
            f"| {r['mb_s']:.2f} | {r['tokens_per_kb']:.1f} |"
        )
    by_key = {(r["n"], r["mode"]): r for r in rows}
    print("\n| new tokens | load time added/merges | encode speed merges/added | tokens merges/added |")
    print("|---:|---:|---:|---:|")
    for n in sizes:
        m, a = by_key[n, MERGES], by_key[n, ADDED_TOKENS]
        print(
            f"| {n} | {a['load_s'] / m['load_s']:.2f}x | {m['mb_s'] / a['mb_s']:.2f}x "
            f"| {m['tokens_per_kb'] / a['tokens_per_kb']:.3f} |"
        )


if __name__ == "__main__":
    main()
