"""What more mined windows buy the output fit at thousands of tokens.

Takes a finished job run (its tokenizer and distilled rows), mines each new token's
windows from the run's corpus at several quotas, and for each quota fits the output rows
on the run's fit text plus that many windows a token (each window's positions weighted by
each `--window_weights` value in turn), measures the token values, prunes
as the job does and scores held-out text: bits per byte against the original model on its
own tokenisation, with and without pruning. One process, the machine's threads.

    python jobs/expand_vocab.py --config jobs/configs/french_5k_cpu.yaml
    python bench/bench_fit_windows.py --config jobs/configs/french_5k_cpu.yaml --quotas 8 2
    python bench/bench_fit_windows.py --config jobs/configs/french_5k_cpu.yaml --quotas 2 --window_weights 0.25
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import ray
import torch

from tokdist_ray.config import FileDataSource
from tokdist_ray.data.corpus.corpus import documents
from tokdist_ray.data.mining.mining import mine_corpus
from tokdist_ray.eval.bits_per_byte import bits_per_byte, heldout_chunks
from tokdist_ray.export.hf import expand_model
from tokdist_ray.job.config import load_config
from tokdist_ray.stages import fit_text, prune_tokens
from tokdist_ray.training.distilled_rows import DISTILLED_ROWS
from tokdist_ray.training.fit_hook import OutputFit
from tokdist_ray.training.snippet_files import read_snippets
from tokdist_ray.vocab.expansion_files import load_expansion
from tokdist_ray.vocab.models import load_model, load_tokenizer
from tokdist_ray.vocab.weights import read_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/french_5k_cpu.yaml")
    parser.add_argument("--run_dir", help="the config's run_dir unless given")
    parser.add_argument("--heldout_bytes", type=int, default=62_000)
    parser.add_argument("--quotas", type=int, nargs="+", default=[8, 2], help="windows per token the fit reads")
    parser.add_argument("--window_weights", type=float, nargs="+", default=[1.0],
                        help="output_fit.window_weight values: each quota is fitted with each")
    parser.add_argument("--seed", type=int, help="the fit's seed (training.seed unless given): fits of the same "
                        "positions differ only in the positions their steps sample")
    args = parser.parse_args()
    config = load_config(args.config, {} if args.seed is None else {"training.seed": args.seed})
    run_dir = Path(args.run_dir or config.run_dir)
    expansion = load_expansion(run_dir / "tokenizer")
    distilled = read_rows(run_dir / "rows" / DISTILLED_ROWS)
    snippets_report = json.loads((run_dir / "snippets_report.json").read_text())
    texts = fit_text(config.data.corpus, config.output_fit, snippets_report, expansion)
    held = heldout_chunks([t for t in documents(FileDataSource(paths=list(config.eval.heldout_paths)))
                           if isinstance(t, str)], 2000, args.heldout_bytes)
    original = bits_per_byte(load_model(config.model, dtype=torch.float32), load_tokenizer(config.model), held)
    print(f"machine: {platform.processor() or platform.machine()}; {len(expansion.tokens)} new tokens; fit text "
          f"{len(texts)} chunks; held-out {original['bytes']} bytes, original {original['bits_per_byte']:.4f} bits/byte")
    print("| windows per token | window weight | windows | fit positions | before a new token | fit steps | "
          "held-back loss | fit s | pruned: tokens kept | fewer held-out tokens | bits/byte vs original | "
          "unpruned: fewer | vs original |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for quota, weight in ((q, w) for q in args.quotas for w in args.window_weights):
        mined = mine_corpus(config.data.corpus, expansion, config.snippets.snippet_len, quota,
                            f"/tmp/bench_fit_windows/{quota}", config.snippets.seed)
        snippets = read_snippets(mined.snippets_path, [t.text for t in expansion.tokens])
        windows = snippets.corpus_windows(quota)
        model = load_model(config.model, dtype=torch.float32)
        started = time.perf_counter()
        settings = replace(config.output_fit, window_weight=weight)
        fitted = OutputFit(settings, tuple(texts))(model, {"input": distilled["input"]}, expansion, config.training,
                                                   windows)
        fit_s = time.perf_counter() - started
        scores = []
        for prune in (True, False):
            pruning = prune_tokens(expansion, fitted.rows, fitted.summary, replace(settings, prune=prune))
            kept = pruning.expansion
            expanded = expand_model(load_model(config.model, dtype=torch.float32), kept.new_start,
                                    pruning.rows["input"], pruning.rows.get("output"))
            scored = bits_per_byte(expanded, kept.tokenizer, held, kept.new_start)
            scores.append((len(kept.tokens), 1 - scored["tokens"] / original["tokens"],
                           scored["bits_per_byte"] / original["bits_per_byte"] - 1))
        summary = fitted.summary
        (kept_n, fewer, vs), (_, fewer_all, vs_all) = scores
        print(f"| {quota} | {weight:g} | {len(windows)} | {summary['positions']} | {summary['before_new_tokens']} | "
              f"{summary['steps']} | {summary['held_back_loss_best']:.4f} | {fit_s:.0f} | "
              f"{kept_n} | {fewer:.1%} | {vs:+.2%} | {fewer_all:.1%} | {vs_all:+.2%} |", flush=True)


if __name__ == "__main__":
    main()
