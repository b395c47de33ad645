"""Token selection benchmark: continued BPE training against the word heuristic, on the
Python docs with SmolLM2's tokenizer, side by side in one run.

For N = 100, 1,000 and 5,000 tokens chosen on the training split (every file but every
tenth), each expanded into a tokenizer built on merges: ids saved on the held-out split
(every tenth file), the tokens merges could not produce and why, the intermediate tokens
merge paths added, the round trip decode(encode(text)) == text on every held-out
document, and, on snippets mined from the held-out split, the agreement the training
relies on: a snippet's expanded ids re-encode from its own text, and its teacher ids
(new ids expanded into their pieces) are the original tokenizer's encoding of that text.

    python bench/bench_selection.py                 # N = 100, 1000, 5000 (a few minutes)
    python bench/bench_selection.py --sizes 100     # a quick look
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokdist_ray.data.mining.local_mining import mine_snippets  # noqa: E402
from tokdist_ray.vocab.alignment import PieceAligner  # noqa: E402
from tokdist_ray.vocab.bpe_training import continue_bpe, pre_token_counts  # noqa: E402
from tokdist_ray.vocab.merges import expand_with_merges  # noqa: E402
from tokdist_ray.vocab.models import load_tokenizer  # noqa: E402
from tokdist_ray.vocab.selection import frequent_fragmented_words  # noqa: E402

DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def cpu_flags() -> str:
    flags = next((line for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                  if line.startswith("Flags")), "")
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags)


def split_docs() -> tuple[list[str], list[str]]:
    files = sorted(DOCS.rglob("*.txt"))
    read = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return [t for i, t in enumerate(read) if i % 10], [t for i, t in enumerate(read) if i % 10 == 0]


def n_ids(tokenizer, texts: list[str]) -> int:
    return sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False))


def agreement(tokenizer, expansion, heldout: list[str]) -> tuple[int, int, int]:
    """(snippets, whose expanded ids re-encode from their text, whose teacher ids are the
    original encoding of their text), on snippets mined from the held-out text."""
    snippets, _ = mine_snippets(heldout, expansion, snippet_len=32, snippets_per_token=4)
    aligner = PieceAligner.for_tokens(expansion.tokens, expansion.new_start)
    prefix = 1 if tokenizer.bos_token_id is not None else 0
    re_encoded = teacher = 0
    for snippet in snippets:
        ids = snippet["input_ids"][prefix:]
        text = expansion.tokenizer.decode(ids)
        re_encoded += expansion.tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        teacher += aligner.align(ids).teacher_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(snippets), re_encoded, teacher


def measure(name: str, tokenizer, words: list[str], heldout: list[str], before: int, check_snippets: bool) -> dict:
    start = time.perf_counter()
    expansion = expand_with_merges(tokenizer, words)
    seconds = time.perf_counter() - start
    after = n_ids(expansion.tokenizer, heldout)
    round_trip = sum(expansion.tokenizer.decode(expansion.tokenizer(t, add_special_tokens=False)["input_ids"]) == t
                     for t in heldout)
    row = {
        "selection": name, "asked": len(words), "kept": expansion.n_requested,
        "intermediates": len(expansion.intermediates), "unreachable": dict(Counter(s["reason"] for s in expansion.skipped)),
        "saved": before - after, "saved_pct": 100 * (before - after) / before,
        "round_trip": f"{round_trip}/{len(heldout)}", "build_s": seconds,
    }
    if check_snippets:
        row["snippets"] = agreement(tokenizer, expansion, heldout)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    ap.add_argument("--min-count", type=int, default=2)
    args = ap.parse_args()
    tokenizer = load_tokenizer("bundled:smollm2")
    train, heldout = split_docs()
    before = n_ids(tokenizer, heldout)
    print(f"SmolLM2 tokenizer; Python docs: {len(train)} training files ({sum(map(len, train)) / 1e6:.1f} MB), "
          f"{len(heldout)} held-out ({sum(map(len, heldout)) / 1e6:.1f} MB, {before} ids); CPU flags: {cpu_flags()}")

    start = time.perf_counter()
    counts = pre_token_counts(tokenizer, train)
    counted = time.perf_counter() - start
    start = time.perf_counter()
    learned = continue_bpe(tokenizer, counts, max(args.sizes), min_count=args.min_count)
    print(f"pre-token counts {counted:.1f} s ({len(counts)} distinct); continued BPE, {len(learned)} merges: "
          f"{time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    words = [w for w, _ in frequent_fragmented_words(tokenizer, train, max(args.sizes), min_pieces=2,
                                                     min_count=args.min_count)]
    print(f"word heuristic, {len(words)} words: {time.perf_counter() - start:.1f} s")

    rows = []
    for n in args.sizes:
        check = n == args.sizes[min(1, len(args.sizes) - 1)]
        rows.append(measure("continued BPE", tokenizer, [t.text for t in learned[:n]], heldout, before, check))
        rows.append(measure("word heuristic", tokenizer, words[:n], heldout, before, check))
        for row in rows[-2:]:
            print(row, flush=True)

    print("\n| N | selection | kept | intermediates | unreachable (reason: count) | held-out ids saved | round trip |")
    print("|---:|---|---:|---:|---|---:|---|")
    for row in rows:
        reasons = ", ".join(f"{k}: {v}" for k, v in row["unreachable"].items()) or "-"
        print(f"| {row['asked']} | {row['selection']} | {row['kept']} | {row['intermediates']} | {reasons} | "
              f"{row['saved']} ({row['saved_pct']:.2f}%) | {row['round_trip']} |")
    for row in rows:
        if "snippets" in row:
            n, re_encoded, teacher = row["snippets"]
            print(f"{row['selection']}, N={row['asked']}: {n} held-out snippets; expanded ids re-encode from their "
                  f"text: {re_encoded}/{n}; teacher ids = original encoding of the text: {teacher}/{n}")


if __name__ == "__main__":
    main()
