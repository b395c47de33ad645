"""How much text the output fit needs, and what reading the mined snippets too buys.

Takes a finished job run (its exported model: distilled input rows) and reads through
the expanded model, once each: the fit text the run's settings choose, the snippets
mining found in the corpus, and held-out text. The final states do not depend on the
output rows, so each variant below is fitted on the first share of the fit text (with or
without the snippets) and scored on the held-out positions without another forward
pass: bits per byte of the held-out text against the original model's on its own
tokenisation.

    python jobs/expand_vocab.py --config jobs/configs/demo_full_cpu.yaml
    python bench/bench_fit_data.py --run_dir runs/demo_full --config jobs/configs/demo_full_cpu.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from tokdist_ray.config import FileDataSource
from tokdist_ray.data.corpus.corpus import documents
from tokdist_ray.eval.bits_per_byte import heldout_chunks
from tokdist_ray.job.config import load_config
from tokdist_ray.stages import fit_text
from tokdist_ray.training.output_fit import (
    HELD_BACK_EVERY,
    FitPositions,
    collect_positions,
    fit_chunk_ids,
    fit_output_rows,
    position_losses,
    reading_passes,
)
from tokdist_ray.training.snippet_files import read_snippets
from tokdist_ray.vocab.expansion_files import load_expansion
from tokdist_ray.vocab.models import load_model, load_tokenizer
from tokdist_ray.vocab.special import start_token


@torch.no_grad()
def old_target_terms(model, tokenizer, chunks: list[str], new_start: int, at: FitPositions) -> float:
    """Sum over positions before an old token of (old normaliser - its logit): with the
    fit's position losses, the expanded model's whole NLL of the text."""
    ids = fit_chunk_ids(tokenizer, chunks, start_token(tokenizer), None)
    targets = torch.cat([torch.tensor(ids[i][1:]) for batch in reading_passes(ids) for i in batch])  # reading order
    old = targets < new_start
    rows = model.get_output_embeddings().weight[targets[old]]
    logits = (at.hidden[old] * rows.float()).sum(-1)
    return float((at.old_log_norm[old] - logits).sum())


@torch.no_grad()
def original_nll(model_path: str, chunks: list[str]) -> float:
    model, tokenizer = load_model(model_path, dtype=torch.float32), load_tokenizer(model_path)
    total = 0.0
    for chunk in chunks:
        ids = torch.tensor([[start_token(tokenizer), *tokenizer(chunk, add_special_tokens=False)["input_ids"]]])
        logits = model(ids).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
    return total


def positions(model, tokenizer, chunks, new_start, held_every_tenth: bool) -> FitPositions:
    ids = fit_chunk_ids(tokenizer, chunks, start_token(tokenizer), None)
    rows = model.get_input_embeddings().weight[new_start:].detach()
    held_back = [held_every_tenth and i % HELD_BACK_EVERY == HELD_BACK_EVERY - 1 for i in range(len(ids))]
    return collect_positions(model, rows, new_start, ids, held_back, mixed_precision=False)


def join(*parts: FitPositions) -> FitPositions:
    return FitPositions.joined(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default="runs/demo_full")
    parser.add_argument("--config", default="jobs/configs/demo_full_cpu.yaml")
    parser.add_argument("--heldout", default="/usr/share/doc/maint-guide-fr/maint-guide.fr.txt.gz")
    parser.add_argument("--heldout_bytes", type=int, default=62_000)  # at most: 61,064 bytes of whole chunks
    parser.add_argument("--shares", default="0.125,0.25,0.5,1.0")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config(args.config, {})
    run_dir = Path(args.run_dir)
    expansion = load_expansion(run_dir / "tokenizer")
    snippets_report = json.loads((run_dir / "snippets_report.json").read_text())
    model = load_model(str(run_dir / "model"), dtype=torch.float32)
    tokenizer, new_start = expansion.tokenizer, expansion.new_start
    initial = model.get_input_embeddings().weight[new_start:].detach().float()  # the tied rows before the fit

    started = time.perf_counter()
    fit_chunks = fit_text(config.data.corpus, config.output_fit, snippets_report, expansion)
    fractions = sorted(map(float, args.shares.split(",")))
    ends = [round(f * len(fit_chunks)) for f in fractions]
    segments = [positions(model, tokenizer, fit_chunks[lo:hi], new_start, held_every_tenth=True)
                for lo, hi in zip([0, *ends], ends)]
    read_s = time.perf_counter() - started
    texts = [t for t in documents(FileDataSource(paths=[args.heldout])) if isinstance(t, str)]
    held = heldout_chunks(texts, 2000, args.heldout_bytes)
    held_at = positions(model, tokenizer, held, new_start, held_every_tenth=False)
    constant = old_target_terms(model, tokenizer, held, new_start, held_at)
    held_bytes = sum(len(c.encode()) for c in held)
    original = original_nll(config.model, held) / math.log(2) / held_bytes

    def bits_per_byte(rows: torch.Tensor) -> float:
        with torch.no_grad():
            loss = sum(float(position_losses(rows, held_at, part).sum())
                       for part in torch.arange(len(held_at.hidden)).split(8192))
        return (constant + loss) / math.log(2) / held_bytes

    print(f"machine: {platform.processor() or platform.machine()}; fit text {len(fit_chunks)} chunks, "
          f"{sum(len(x.hidden) for x in segments)} positions, read in {read_s:.0f} s; held-out {held_bytes} bytes, "
          f"{len(held_at.hidden)} positions; original {original:.4f} bits/byte")
    print("| fitted on | positions | new-token targets | bits/byte | vs original |")
    print("|---|---:|---:|---:|---:|")
    tied = bits_per_byte(initial)
    print(f"| tied (distilled input rows) | 0 | 0 | {tied:.4f} | {100 * (tied / original - 1):+.2f}% |")
    snippets = read_snippets(str(run_dir / "snippets"), [t.text for t in expansion.tokens])
    windows = snippets.corpus_windows(config.output_fit.snippets_per_token)  # the windows the job's fit reads
    t = time.perf_counter()
    snip_at = collect_positions(model, initial, new_start, windows, [False] * len(windows), mixed_precision=False)
    print(f"snippets: {len(windows)}, {len(snip_at.hidden)} positions read in {time.perf_counter() - t:.0f} s")
    for k, fraction in enumerate(fractions):
        text_at = join(*segments[: k + 1])
        for with_snippets in (False, True):
            part = join(text_at, snip_at) if with_snippets else text_at
            rows = fit_output_rows(initial, part, config.output_fit, seed=0).rows
            bpb = bits_per_byte(rows)
            print(f"| {fraction:g} of the fit text{' + the snippets' if with_snippets else ''} | {len(part.hidden)} | "
                  f"{int((part.new_target >= 0).sum())} | {bpb:.4f} | {100 * (bpb / original - 1):+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
