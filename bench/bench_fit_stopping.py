"""Where the output fit should stop: the held-out text's bits per byte along the fit.

Takes a finished job run (its tokenizer, distilled rows, snippets) and fits the output
rows again in one process on the run's fit text and windows, as the job does, once per
learning rate and window weight asked for, all on the same positions. At each check it
prints the fit's held-back loss and the held-out text's bits per byte (unpruned) against
the original model's; with --past_stop the fit goes on to max_steps past the point where
its check stops it. The input rows are fixed while the output rows are fitted, so every
held-out state is computed once and a check costs one pass of the new rows over them.

The job's own fitted rows are scored the same way first, and the last fit's rows once
more through the expanded model as the evaluation scores it (the two agree to round-off).

    python jobs/expand_vocab.py --config jobs/configs/french_5k_cpu.yaml
    python bench/bench_fit_stopping.py --config jobs/configs/french_5k_cpu.yaml --max_steps 1200 --past_stop
    python bench/bench_fit_stopping.py --fits 1e-3:1 1e-3:0.25 3e-4:1
"""

from __future__ import annotations

import argparse
import json
import math
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
from tokdist_ray.stages import fit_text
from tokdist_ray.training import output_fit
from tokdist_ray.training.distilled_rows import DISTILLED_ROWS, FITTED_ROWS
from tokdist_ray.training.output_fit import (
    FitPositions,
    collect_positions,
    fit_chunk_ids,
    fit_output_rows,
    fit_sequences,
    position_losses,
    reading_passes,
)
from tokdist_ray.training.snippet_files import read_snippets
from tokdist_ray.vocab.expansion_files import load_expansion
from tokdist_ray.vocab.models import load_model, load_tokenizer
from tokdist_ray.vocab.special import start_token
from tokdist_ray.vocab.weights import read_rows


def total_loss(rows: torch.Tensor, at: FitPositions, index: torch.Tensor) -> float:
    """Nats summed over the positions at `index`, unweighted."""
    with torch.no_grad():
        return float(sum(position_losses(rows, at, part).sum() for part in index.split(8192)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/french_5k_cpu.yaml")
    parser.add_argument("--run_dir", help="the config's run_dir unless given")
    parser.add_argument("--heldout_bytes", type=int, default=62_000)
    parser.add_argument("--fits", nargs="+", metavar="LR:WEIGHT[:LOGITS[:POSITIONS]]",
                        help="a fit for each learning rate, window weight, max_step_logits and batch_positions "
                             "(the config's output_fit's unless given)")
    parser.add_argument("--max_steps", type=int, help="output_fit.max_steps unless given")
    parser.add_argument("--past_stop", action="store_true", help="take max_steps whatever the checks say")
    args = parser.parse_args()
    config = load_config(args.config)
    fit = config.output_fit
    run_dir = Path(args.run_dir or config.run_dir)
    expansion = load_expansion(run_dir / "tokenizer")
    new_start, names = expansion.new_start, [t.text for t in expansion.tokens]
    input_rows = read_rows(run_dir / "rows" / DISTILLED_ROWS)["input"]
    texts = fit_text(config.data.corpus, fit, json.loads((run_dir / "snippets_report.json").read_text()), expansion)
    windows = read_snippets(str(run_dir / "snippets"), names).corpus_windows(fit.snippets_per_token)
    held = heldout_chunks([t for t in documents(FileDataSource(paths=list(config.eval.heldout_paths)))
                           if isinstance(t, str)], 2000, args.heldout_bytes)
    held_bytes = sum(len(c.encode("utf-8")) for c in held)
    model = load_model(config.model, dtype=torch.float32)
    original = bits_per_byte(model, load_tokenizer(config.model), held)["bits_per_byte"]
    print(f"machine: {platform.processor() or platform.machine()}; {len(names)} new tokens; fit text {len(texts)} "
          f"chunks, {len(windows)} windows; held-out {held_bytes} bytes, original {original:.4f} bits/byte", flush=True)

    mixed = config.training.mixed_precision
    share = fit_sequences(model, expansion.tokenizer, texts, windows)
    at = collect_positions(model, input_rows, new_start, share.ids, share.held_back, None, mixed)
    in_window = torch.cat([torch.full((len(share.ids[i]) - 1,), share.numbers[i] >= share.n_texts)
                           for batch in reading_passes(share.ids) for i in batch])  # in the order they were read
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    heldout_ids = fit_chunk_ids(expansion.tokenizer, held, start_token(expansion.tokenizer), limit)
    heldout_at = collect_positions(model, input_rows, new_start, heldout_ids, [False] * len(heldout_ids), None, mixed)
    everywhere = torch.arange(len(heldout_at.held_back))

    def expanded_bits(output_rows: torch.Tensor) -> float:
        """Held-out bits per byte of the expanded model, as the evaluation scores it."""
        expanded = expand_model(load_model(config.model, dtype=torch.float32), new_start, input_rows, output_rows)
        return bits_per_byte(expanded, expansion.tokenizer, held, new_start)["bits_per_byte"]

    # the fit's loss leaves out what the new rows cannot change (an old token's own logit):
    # one full score of the distilled rows as output rows gives it
    tied_bits = expanded_bits(input_rows)
    tied_nats = total_loss(input_rows, heldout_at, everywhere)

    def vs_original(rows: torch.Tensor) -> float:
        nats = total_loss(rows, heldout_at, everywhere) - tied_nats
        return (tied_bits + nats / math.log(2) / held_bytes) / original - 1

    print(f"the distilled rows as output rows: held-out {vs_original(input_rows):+.2%} vs original", flush=True)
    if (run_dir / "rows" / FITTED_ROWS).exists():  # not after `tokdist-ray distill`
        job_rows = read_rows(run_dir / "rows" / FITTED_ROWS)
        print(f"the job's fitted rows: held-out {vs_original(job_rows['output']):+.2%} vs original (unpruned)", flush=True)
    if args.past_stop:
        output_fit.PATIENCE = args.max_steps or fit.max_steps  # the trace goes on past the job's stop
    summaries = []
    for spec in args.fits or [f"{fit.learning_rate}:{fit.window_weight}"]:
        lr, weight, *step = (float(x) for x in spec.split(":"))
        settings = replace(fit, learning_rate=lr, window_weight=weight, max_steps=args.max_steps or fit.max_steps,
                           max_step_logits=int(step[0]) if step else fit.max_step_logits,
                           batch_positions=int(step[1]) if len(step) > 1 else fit.batch_positions)
        print(f"\nlearning rate {lr:g}, window weight {weight:g}, max_step_logits {settings.max_step_logits}, "
              f"batch_positions {settings.batch_positions}\n\n"
              "| step | fit s | held-back loss | held-out bits/byte vs original |\n|---:|---:|---:|---:|")
        trace: list[tuple[int, float]] = []
        started, scoring = time.perf_counter(), 0.0  # the fit's own seconds leave out this bench's scoring

        def on_check(step: int, loss: float, rows: torch.Tensor) -> None:
            nonlocal scoring
            scored = time.perf_counter()
            trace.append((step, vs_original(rows)))
            scoring += time.perf_counter() - scored
            print(f"| {step} | {scored - started - scoring:.0f} | {loss:.4f} | {trace[-1][1]:+.2%} |", flush=True)

        result = fit_output_rows(input_rows, replace(at, weight=torch.where(in_window, weight, 1.0)), settings,
                                 config.training.seed, on_check=on_check)
        seconds = time.perf_counter() - started - scoring
        best_step, best = min(trace, key=lambda row: row[1])
        summaries.append(f"| {lr:g} | {weight:g} | {result.summary['positions_per_step']} | "
                         f"{result.summary['rows_per_step']} | {result.summary['steps']} | "
                         f"{result.summary['held_back_loss_best']:.4f} | {vs_original(result.rows):+.2%} | "
                         f"{best:+.2%} at step {best_step} | {seconds:.0f} |")
    print("\n| learning rate | window weight | positions per step | rows per step | steps | held-back loss, kept rows | "
          "held-out vs original, kept rows | best held-out on the trace | fit s |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(summaries))
    print(f"the last kept rows through the expanded model: {expanded_bits(result.rows) / original - 1:+.2%} "
          f"(from the fixed states {vs_original(result.rows):+.2%})")


if __name__ == "__main__":
    main()
