"""How far merges can compress held-out text: the original tokenizer, a run's continued-BPE
tokenizer, and byte-level BPEs trained from scratch on the same corpus with the original's
pre-tokenizer (Hugging Face `tokenizers`), counted on the same held-out text, by the kind
of pre-token the ids fall in (words, whitespace, digits, the rest).

A fresh tokenizer is no option for an expansion (it would replace the whole vocabulary and
every row the model learned); it says what the corpus allows any merges to reach, and so
what continued BPE leaves on the table: its merges start from the original's pieces and
run after the original's merges, and it learns no merge of only digits or whitespace.

    python jobs/expand_vocab.py --config jobs/configs/french_30k_cpu.yaml
    python bench/bench_bpe_ceiling.py --config jobs/configs/french_30k_cpu.yaml --sizes 32000 79152

Byte-level BPE tokenizers only (SmolLM2's, Llama 3's, Qwen's).
"""

from __future__ import annotations

import argparse
import platform
import re
import time
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokdist_ray.config import FileDataSource
from tokdist_ray.data.corpus.corpus import documents
from tokdist_ray.eval.bits_per_byte import heldout_chunks
from tokdist_ray.job.config import load_config
from tokdist_ray.vocab.expansion_files import load_expansion
from tokdist_ray.vocab.models import load_tokenizer

KINDS = ("words", "whitespace", "digits", "other")


def kind(text: str) -> str:
    if not text.strip():
        return "whitespace"
    if re.fullmatch(r"\s?\d+", text):
        return "digits"
    return "words" if re.fullmatch(r"\s?[^\W\d_]+", text) else "other"


def ids_by_kind(tokenizer: Tokenizer, text: str) -> Counter:
    """Ids of `text` by the kind of pre-token they fall in (the original's pre-tokenizer)."""
    counts = Counter()
    for piece, (start, end) in tokenizer.pre_tokenizer.pre_tokenize_str(text):
        counts[kind(text[start:end])] += len(tokenizer.model.tokenize(piece))
    return counts


def fresh_bpe(original: Tokenizer, texts: list[str], size: int, min_count: int) -> Tokenizer:
    """A BPE of `size` ids trained from bytes on `texts`, with `original`'s pre-tokenizer,
    normaliser and special tokens."""
    fresh = Tokenizer.from_str(original.to_str())
    fresh.model = models.BPE()
    fresh.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, min_frequency=min_count, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/french_30k_cpu.yaml")
    parser.add_argument("--run_dir", help="the config's run_dir unless given")
    parser.add_argument("--heldout_bytes", type=int, default=62_000, help="0: all of it")
    parser.add_argument("--sizes", nargs="*", type=int, default=[32_000, 79_152], help="fresh BPEs' vocabulary sizes")
    args = parser.parse_args()
    config = load_config(args.config, {})
    run_dir = Path(args.run_dir or config.run_dir)
    original = load_tokenizer(config.model).backend_tokenizer
    if not isinstance(original.decoder, decoders.ByteLevel):
        raise SystemExit(f"{config.model}: not a byte-level BPE tokenizer (decoder {type(original.decoder).__name__})")
    continued = load_expansion(run_dir / "tokenizer")
    heldout = [t for t in documents(FileDataSource(paths=list(config.eval.heldout_paths))) if isinstance(t, str)]
    text = "\n".join(heldout_chunks(heldout, 2000, args.heldout_bytes or 10**12))
    kb = len(text.encode()) / 1000
    corpus = [t for t in documents(config.data.corpus) if isinstance(t, str)]

    tokenizers = [("original", len(original.get_vocab()), original),
                  (f"continued BPE ({len(continued.tokens)} new tokens, {run_dir})", len(continued.tokenizer),
                   continued.tokenizer.backend_tokenizer)]
    for size in args.sizes:
        started = time.perf_counter()
        fresh = fresh_bpe(original, corpus, size, config.tokens.min_count)
        tokenizers.append((f"fresh BPE on the corpus ({time.perf_counter() - started:.0f} s to train)", size, fresh))

    print(f"machine: {platform.processor() or platform.machine()}; held-out {kb:.1f} kB; corpus "
          f"{sum(len(t.encode()) for t in corpus) / 1e6:.1f} MB in {len(corpus)} documents; min count "
          f"{config.tokens.min_count}")
    print("| tokenizer | ids | held-out ids per KB | fewer than the original | " + " | ".join(KINDS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(KINDS))
    base = None
    for name, size, tokenizer in tokenizers:
        counts = ids_by_kind(tokenizer, text)
        total = sum(counts.values())
        base = base or total
        print(f"| {name} | {size:,} | {total / kb:.1f} | {1 - total / base:.1%} | "
              + " | ".join(f"{counts[k]:,}" for k in KINDS) + " |")


if __name__ == "__main__":
    main()
