"""report.json: one format for the API's and the job's expanded models."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def tokens_added(tokens: Sequence, new_start: int, snippet_counts: dict[str, int],
                 positions: Sequence[int]) -> list[dict]:
    """Per new token: `snippets`, the training snippets cut around it; `positions_per_epoch`,
    every occurrence that trained it, in those and in other tokens' snippets."""
    return [
        {"token": t.text, "id": new_start + i, "phrase_ids": list(t.phrase_ids), "snippets": snippet_counts.get(t.text, 0),
         "positions_per_epoch": positions[i]}
        for i, t in enumerate(tokens)
    ]


def public_model_name(model: str) -> str:
    """The base model as a published report names it: a hub id or bundled name as given, a
    local path by its folder name only (a model directory is shared; its paths are not)."""
    path = Path(model).expanduser()
    if model.startswith("bundled:") or not (path.is_absolute() or path.exists()):
        return model
    return path.name


def expansion_report(model: str, expansion, record: dict, settings: dict, not_distilled: list[dict], snippets: dict,
                     **sections) -> dict:
    """report.json of an expanded model, the API's and the job's alike: its new tokens with
    ids, snippet counts and the positions that trained them, the training history
    (`record`: training.distilled_rows.training_record), the settings, the tokenizer, the
    tokens skipped or not distilled, the snippets report (without local paths), then where
    training ran, when it ran on Ray, and any further sections (output_fit, timings...)."""
    from tokdist_ray.vocab.expansion_files import expansion_summary

    tokens, new_start = expansion.tokens, expansion.new_start
    return {
        "model": public_model_name(model),
        "tokens_added": tokens_added(tokens, new_start, record["snippet_counts"], record["positions_per_token"]),
        "training": record["training"],
        "settings": settings,
        "tokenizer": expansion_summary(expansion),
        "tokens_skipped": expansion.skipped,
        "tokens_not_distilled": not_distilled,
        "snippets": without_paths(snippets),
        **({"distributed": record["distributed"]} if "distributed" in record else {}),
        **sections,
    }


def without_paths(snippets_report: dict) -> dict:
    """The snippets report as a published model carries it: the run's local files left out."""
    mining = {k: v for k, v in snippets_report.get("mining", {}).items() if k != "snippets_path"}
    return snippets_report | ({"mining": mining} if "mining" in snippets_report else {})
