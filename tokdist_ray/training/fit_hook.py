"""The output fit as the pipeline hands it to the distillation's workers: run after
training on the model they hold already (sharded, under ZeRO-3), so fitting costs no
second load of the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from tokdist_ray.config import DistillationConfig, OutputFitConfig
from tokdist_ray.training.distilled_rows import FittedRows
from tokdist_ray.training.output_fit import fit_on_text


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
        return FittedRows(fitted, summary)
