"""The output fit as the pipeline hands it to the distillation's workers: run after
training on the model they hold already (sharded, under ZeRO-3), so fitting costs no
second load of the model."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from tokdist_ray.config import DistillationConfig, OutputFitConfig
from tokdist_ray.training.distilled_rows import FittedRows
from tokdist_ray.training.output_fit import fit_on_text, fit_sequences
from tokdist_ray.training.token_value import measure_token_value


@dataclass(frozen=True)
class OutputFit:
    settings: OutputFitConfig
    texts: tuple[str, ...]  # the fit text (stages.fit_text), each worker reads its share

    def __call__(self, model, rows: dict[str, torch.Tensor], expansion, training: DistillationConfig,
                 windows: Sequence[list[int]] = (), rank: int = 0, world: int = 1,
                 all_reduce: Callable[[torch.Tensor], None] = lambda t: None) -> FittedRows:
        """`windows`: snippets mined from the corpus, expanded ids (snippet_files.corpus_windows,
        settings.snippets_per_token of each token)."""
        fitted, summary = fit_on_text(model, rows, expansion.new_start, expansion.tokenizer, self.texts, self.settings,
                                      training.seed, training.mixed_precision, rank, world, all_reduce, windows)
        if "skipped" not in summary:  # what each token costs and saves: pruning reads it (stages.prune_tokens)
            started = time.perf_counter()
            device = next(model.parameters()).device
            share = fit_sequences(model, expansion.tokenizer, self.texts, windows, rank, world)
            value = measure_token_value(
                model, {name: row.to(device) for name, row in fitted.items()}, expansion.new_start,
                [t.phrase_ids for t in expansion.tokens], share.chunks, share.held_back[: len(share.chunks)],
                sum(share.text_bytes), share.held_back_text_bytes, training.mixed_precision, rank, world, all_reduce)
            summary = {**summary, "token_value": value.as_record(),
                       "seconds": round(summary["seconds"] + time.perf_counter() - started, 3)}
        return FittedRows(fitted, summary)
