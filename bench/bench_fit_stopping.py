"""Where the output fit should stop: the held-out text's bits per byte along the fit.

Takes a finished job run (its tokenizer, distilled rows, snippets) and fits the output
rows again in one process on the run's fit text and windows, as the job does, but on
past the point where the held-back check stops it. At each check it prints the fit's
held-back loss, that loss on the held-back chunks of the fit text alone and on the
held-back windows alone, and the held-out text's bits per byte (unpruned) against the
original model's. The input rows are fixed while the output rows are fitted, so every
held-out state is computed once and a check costs one pass of the new rows over them.

The job's own fitted rows are scored the same way first, and the last rows once more
through the expanded model as the evaluation scores it (the two must agree to round-off).

    python jobs/expand_vocab.py --config jobs/configs/french_5k_cpu.yaml
    python bench/bench_fit_stopping.py --config jobs/configs/french_5k_cpu.yaml --max_steps 1500
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
)
from tokdist_ray.training.snippet_files import read_snippets
from tokdist_ray.vocab.expansion_files import load_expansion
from tokdist_ray.vocab.models import load_model, load_tokenizer
from tokdist_ray.vocab.special import start_token
from tokdist_ray.vocab.weights import read_rows

PATIENCE = output_fit.PATIENCE  # the job's: the trace goes on past it


def concatenated(a: FitPositions, b: FitPositions) -> FitPositions:
    return FitPositions(*(torch.cat([x, y]) for x, y in zip(vars(a).values(), vars(b).values())))


def total_loss(rows: torch.Tensor, at: FitPositions, index: torch.Tensor) -> float:
    """Nats summed over the positions at `index`, unweighted."""
    with torch.no_grad():
        return float(sum(position_losses(rows, at, part).sum() for part in index.split(8192)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/french_5k_cpu.yaml")
    parser.add_argument("--run_dir", help="the config's run_dir unless given")
    parser.add_argument("--heldout_bytes", type=int, default=62_000)
    parser.add_argument("--max_steps", type=int, default=1500, help="steps the fit takes, whatever its checks say")
    parser.add_argument("--learning_rate", type=float, help="output_fit.learning_rate unless given")
    args = parser.parse_args()
    config = load_config(args.config)
    settings = replace(config.output_fit, max_steps=args.max_steps,
                       learning_rate=args.learning_rate or config.output_fit.learning_rate)
    run_dir = Path(args.run_dir or config.run_dir)
    expansion = load_expansion(run_dir / "tokenizer")
    new_start, names = expansion.new_start, [t.text for t in expansion.tokens]
    input_rows = read_rows(run_dir / "rows" / DISTILLED_ROWS)["input"]
    texts = fit_text(config.data.corpus, settings, json.loads((run_dir / "snippets_report.json").read_text()), expansion)
    windows = read_snippets(str(run_dir / "snippets"), names).corpus_windows(settings.snippets_per_token)
    held = heldout_chunks([t for t in documents(FileDataSource(paths=list(config.eval.heldout_paths)))
                           if isinstance(t, str)], 2000, args.heldout_bytes)
    held_bytes = sum(len(c.encode("utf-8")) for c in held)
    model = load_model(config.model, dtype=torch.float32)
    original = bits_per_byte(model, load_tokenizer(config.model), held)["bits_per_byte"]
    print(f"machine: {platform.processor() or platform.machine()}; {len(names)} new tokens; fit text {len(texts)} "
          f"chunks, {len(windows)} windows; held-out {held_bytes} bytes, original {original:.4f} bits/byte", flush=True)

    mixed = config.training.mixed_precision
    share = fit_sequences(model, expansion.tokenizer, texts, windows)
    n = len(share.chunks)
    weights = [1.0] * n + [settings.window_weight] * (len(share.ids) - n)
    text_at = collect_positions(model, input_rows, new_start, share.ids[:n], share.numbers[:n], None, mixed,
                                weights=weights[:n])
    window_at = collect_positions(model, input_rows, new_start, share.ids[n:], share.numbers[n:], None, mixed,
                                  weights=weights[n:])
    at = concatenated(text_at, window_at)
    is_text = torch.arange(len(at.held_back)) < len(text_at.held_back)
    held_text = (at.held_back & is_text).nonzero().squeeze(1)
    held_windows = (at.held_back & ~is_text).nonzero().squeeze(1)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    heldout_ids = fit_chunk_ids(expansion.tokenizer, held, start_token(expansion.tokenizer), limit)
    heldout_at = collect_positions(model, input_rows, new_start, heldout_ids, [0] * len(heldout_ids), None, mixed)
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

    job_rows = read_rows(run_dir / "rows" / FITTED_ROWS)
    print(f"the job's fitted rows: held-out {vs_original(job_rows['output']):+.2%} vs original (unpruned); "
          f"the distilled rows as output rows: {vs_original(input_rows):+.2%}", flush=True)
    print("| step | held-back loss | held-back text | held-back windows | held-out bits/byte vs original |")
    print("|---:|---:|---:|---:|---:|")
    trace: list[tuple[int, float, float, float]] = []
    last = {}

    def on_check(step: int, loss: float, rows: torch.Tensor) -> None:
        last["rows"] = rows.clone()
        text = total_loss(rows, at, held_text) / len(held_text)
        window = total_loss(rows, at, held_windows) / max(1, len(held_windows))
        trace.append((step, loss, text, vs_original(rows)))
        print(f"| {step} | {loss:.4f} | {text:.4f} | {window:.4f} | {trace[-1][3]:+.2%} |", flush=True)

    output_fit.PATIENCE = args.max_steps
    started = time.perf_counter()
    fit_output_rows(input_rows, at, settings, config.training.seed, on_check=on_check)
    print(f"fit: {time.perf_counter() - started:.0f} s for {trace[-1][0]} steps")
    for name, column in (("held-back loss", 1), ("held-back text", 2), ("held-out (the target)", 3)):
        print(f"stopped by {name}: {stopping_step(trace, column)}")
    print(f"last rows through the expanded model: {expanded_bits(last['rows']) / original - 1:+.2%} "
          f"(from the fixed states {trace[-1][3]:+.2%})")


def stopping_step(trace: list[tuple[int, float, float, float]], column: int) -> str:
    """Where a fit checked on `column` stops (as the job's does: PATIENCE checks without a
    new best) and keeps its best rows, and the held-out figure of those rows."""
    best, since = 0, 0
    for i, row in enumerate(trace):
        if row[column] < trace[best][column] - 1e-6:
            best, since = i, 0
        elif i:
            since += 1
        if since >= PATIENCE:
            break
    step, _, _, heldout = trace[best]
    return f"keeps step {step} (stops at {trace[min(i, len(trace) - 1)][0]}), held-out {heldout:+.2%}"


if __name__ == "__main__":
    main()
