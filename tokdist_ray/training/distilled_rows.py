"""What a distillation run leaves for the stages after it, in one folder (`rows_dir`) on
storage the driver and the next stage's workers see:

    distilled_rows.safetensors   the new rows as distillation left them ("input", and
                                 "output" for untied rows; fp32)
    training.json                the training history, the snippets and positions that
                                 trained each new token, where each rank ran
    fitted_rows.safetensors      the rows after the output fit, when the fit ran on the
    output_fit.json              same workers (training/fit_hook.py), and its summary
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tokdist_ray.atomic import atomic_write_text
from tokdist_ray.vocab.weights import read_rows, write_rows

DISTILLED_ROWS = "distilled_rows.safetensors"
TRAINING_RECORD = "training.json"
FITTED_ROWS = "fitted_rows.safetensors"
FIT_RECORD = "output_fit.json"


def positions_per_token(snippet_ids: pa.ListArray, new_start: int, n_new: int) -> list[int]:
    """How often each new id occurs in the training snippets: the student positions that
    train its row in one epoch (an intermediate or a frequent token also occurs in other
    tokens' snippets, so this can far exceed its snippet count)."""
    ids = pc.list_flatten(snippet_ids).to_numpy()
    return np.bincount(ids[ids >= new_start] - new_start, minlength=n_new)[:n_new].tolist()


def training_record(history: dict, snippet_counts: dict[str, int], positions: list[int],
                    distributed: dict | None = None) -> dict:
    """training.json: `history` is TrainingHistory.as_dict()."""
    return {"training": history, "snippet_counts": snippet_counts, "positions_per_token": positions,
            **({"distributed": distributed} if distributed is not None else {})}


@dataclass
class DistilledRows:
    """Rows and what made them, as one stage hands them to the next."""

    rows: dict[str, torch.Tensor]  # "input", and "output" for untied rows
    record: dict  # training_record(...)


@dataclass
class FittedRows:
    rows: dict[str, torch.Tensor]
    summary: dict  # the output fit's summary, report.json's output_fit


def write_distilled(rows_dir: Path, distilled: DistilledRows) -> None:
    rows_dir.mkdir(parents=True, exist_ok=True)
    write_rows(rows_dir / DISTILLED_ROWS, distilled.rows)
    atomic_write_text(rows_dir / TRAINING_RECORD, json.dumps(distilled.record, indent=2, ensure_ascii=False))


def write_fitted(rows_dir: Path, fitted: FittedRows) -> None:
    rows_dir.mkdir(parents=True, exist_ok=True)
    write_rows(rows_dir / FITTED_ROWS, fitted.rows)
    atomic_write_text(rows_dir / FIT_RECORD, json.dumps(fitted.summary, indent=2, ensure_ascii=False, default=str))


def read_distilled(rows_dir: Path) -> DistilledRows:
    return DistilledRows(read_rows(rows_dir / DISTILLED_ROWS), json.loads((rows_dir / TRAINING_RECORD).read_text()))


def read_fitted(rows_dir: Path) -> FittedRows:
    return FittedRows(read_rows(rows_dir / FITTED_ROWS), json.loads((rows_dir / FIT_RECORD).read_text()))
