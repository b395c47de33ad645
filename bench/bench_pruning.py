"""What pruning buys: bits per byte and compression of held-out text with every new token,
and without the ones that do not pay at several thresholds.

Takes a finished job run (its fitted rows and the token values the fit measured, in
rows/output_fit.json) and prunes it as the job does (stages.prune_tokens) at each
`--thresholds` value of output_fit.max_bits_per_saved_id (`none`: nothing pruned), with
each token's occurrences counted on the fit text (as the job prunes) and, with
`--occurrences fit-text corpus`, taken from the counts continued BPE learned the tokens
with on the whole corpus. Each
variant is the original model expanded with the kept rows, read through its own
tokenizer on the same held-out chunks; the original once, on its tokenisation.

    python jobs/expand_vocab.py --config jobs/configs/french_5k_cpu.yaml
    python bench/bench_pruning.py --config jobs/configs/french_5k_cpu.yaml --thresholds none 0 0.5 1 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from tokdist_ray.config import FileDataSource
from tokdist_ray.data.corpus.corpus import documents
from tokdist_ray.eval.bits_per_byte import bits_per_byte, heldout_chunks
from tokdist_ray.export.hf import expand_model
from tokdist_ray.job.config import load_config
from tokdist_ray.job.stages import corpus_counts
from tokdist_ray.stages import prune_tokens
from tokdist_ray.training.distilled_rows import FIT_RECORD, FITTED_ROWS
from tokdist_ray.vocab.expansion_files import load_expansion
from tokdist_ray.vocab.models import load_model, load_tokenizer
from tokdist_ray.vocab.weights import read_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/french_5k_cpu.yaml")
    parser.add_argument("--run_dir", help="the config's run_dir unless given")
    parser.add_argument("--heldout_bytes", type=int, default=62_000)
    parser.add_argument("--thresholds", nargs="+", default=["none", "0", "0.5", "1", "2"])
    parser.add_argument("--occurrences", nargs="+", choices=["fit-text", "corpus"], default=["fit-text"],
                        help="where a token's occurrences come from: the fit text (as the job prunes) or the run's "
                             "corpus counts (the fit text where the tokens have none)")
    args = parser.parse_args()
    config = load_config(args.config, {})
    run_dir = Path(args.run_dir or config.run_dir)
    expansion = load_expansion(run_dir / "tokenizer")
    record = json.loads((run_dir / "rows" / FIT_RECORD).read_text())
    rows = read_rows(run_dir / "rows" / FITTED_ROWS)
    texts = [t for t in documents(FileDataSource(paths=list(config.eval.heldout_paths))) if isinstance(t, str)]
    chunks = heldout_chunks(texts, 2000, args.heldout_bytes)

    original = bits_per_byte(load_model(config.model, dtype=torch.float32), load_tokenizer(config.model), chunks)
    print(f"machine: {platform.processor() or platform.machine()}; {len(expansion.tokens)} new tokens; held-out "
          f"{original['bytes']} bytes; original {original['bits_per_byte']:.4f} bits/byte, "
          f"{original['tokens_per_byte']:.4f} tokens/byte")
    print("| occurrences from | max bits per saved id | new tokens kept | fewer held-out tokens | bits/byte | "
          "vs original | estimated: bits/byte taken out, ids/byte given up | seconds |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    counts = corpus_counts(run_dir)
    for source, threshold in ((s, t) for s in args.occurrences for t in args.thresholds):
        if source == "corpus" and threshold == "none":
            continue  # nothing pruned: the same as the fit text's
        started = time.perf_counter()
        settings = replace(config.output_fit, prune=threshold != "none",
                           max_bits_per_saved_id=0.0 if threshold == "none" else float(threshold))
        pruning = prune_tokens(expansion, rows, record, settings, counts if source == "corpus" else None)
        kept = pruning.expansion
        model = expand_model(load_model(config.model, dtype=torch.float32), kept.new_start, pruning.rows["input"],
                             pruning.rows.get("output"))
        scored = bits_per_byte(model, kept.tokenizer, chunks, kept.new_start)
        report = pruning.report
        estimate = (f"{report['estimated_bits_per_byte']['taken_out']:.4f}, "
                    f"{report['estimated_ids_saved_per_byte']['taken_out']:.4f}") if settings.prune else ""
        print(f"| {pruning.report.get('occurrences_from', '')} | {threshold} | {len(kept.tokens)} | {1 - scored['tokens'] / original['tokens']:.1%} | "
              f"{scored['bits_per_byte']:.4f} | {scored['bits_per_byte'] / original['bits_per_byte'] - 1:+.2%} | "
              f"{estimate} | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
