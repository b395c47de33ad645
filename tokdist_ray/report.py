"""report.json: one format for the API's and the job's expanded models."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokdist_ray.atomic import atomic_write_text


def positions_per_token(snippets: Iterable[Sequence[int]] | pa.ListArray, new_start: int, n_new: int) -> list[int]:
    """How often each new id occurs in the training snippets: the student positions that
    train its row in one epoch (an intermediate or a frequent token also occurs in other
    tokens' snippets, so this can far exceed its snippet count). Snippets as lists or as
    one Arrow list array."""
    if isinstance(snippets, pa.ListArray):
        ids = pc.list_flatten(snippets).to_numpy()
        return np.bincount(ids[ids >= new_start] - new_start, minlength=n_new)[:n_new].tolist()
    counts = Counter(i for ids in snippets for i in ids if i >= new_start)
    return [counts.get(new_start + k, 0) for k in range(n_new)]


def tokens_added(tokens: Sequence, new_start: int, snippet_counts: dict[str, int],
                 positions: Sequence[int] | None = None) -> list[dict]:
    """Per new token: `snippets`, the training snippets cut around it; `positions_per_epoch`,
    every occurrence that trained it, in those and in other tokens' snippets."""
    return [
        {"token": t.text, "id": new_start + i, "phrase_ids": list(t.phrase_ids), "snippets": snippet_counts.get(t.text, 0),
         **({"positions_per_epoch": positions[i]} if positions is not None else {})}
        for i, t in enumerate(tokens)
    ]


def public_model_name(model: str) -> str:
    """The base model as a published report names it: a hub id or bundled name as given, a
    local path by its folder name only (a model directory is shared; its paths are not)."""
    path = Path(model).expanduser()
    if model.startswith("bundled:") or not (path.is_absolute() or path.exists()):
        return model
    return path.name


def expansion_report(model: str, expansion, snippet_ids: Sequence[Sequence[int]], snippet_counts: dict[str, int],
                     history, settings: dict, not_distilled: list[dict], snippets: dict, **sections) -> dict:
    """report.json of an expanded model, the API's and the job's alike: its new tokens with
    ids, snippet counts and the positions that trained them, the training history, the
    settings, the tokenizer, the tokens skipped or not distilled, the snippets report
    (without local paths), then any further sections (timings, distributed...)."""
    from tokdist_ray.vocab.expansion_files import expansion_summary

    tokens, new_start = expansion.tokens, expansion.new_start
    return {
        "model": public_model_name(model),
        "tokens_added": tokens_added(tokens, new_start, snippet_counts,
                                     positions_per_token(snippet_ids, new_start, len(tokens))),
        "training": history.as_dict(),
        "settings": settings,
        "tokenizer": expansion_summary(expansion),
        "tokens_skipped": expansion.skipped,
        "tokens_not_distilled": not_distilled,
        "snippets": without_paths(snippets),
        **sections,
    }


def without_paths(snippets_report: dict) -> dict:
    """The snippets report as a published model carries it: the run's local files left out."""
    mining = {k: v for k, v in snippets_report.get("mining", {}).items() if k != "snippets_path"}
    return snippets_report | ({"mining": mining} if "mining" in snippets_report else {})


def write_report(path: str | Path, report: dict) -> None:
    """Written whole or not at all: a later run trusts what it finds here."""
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False, default=str))


def read_report(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
