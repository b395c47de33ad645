"""report.json: one format for the API's and the job's expanded models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def tokens_added(tokens: Sequence, new_start: int, snippet_counts: dict[str, int]) -> list[dict]:
    return [
        {"token": t.text, "id": new_start + i, "phrase_ids": list(t.phrase_ids), "snippets": snippet_counts.get(t.text, 0)}
        for i, t in enumerate(tokens)
    ]


def expansion_report(model: str, tokens: Sequence, new_start: int, snippet_counts: dict[str, int], history,
                     settings: dict, **sections) -> dict:
    """The report of an expanded model: its new tokens with ids and snippet counts, the
    training history, the settings, then any further sections (snippets, timings...)."""
    return {
        "model": model,
        "tokens_added": tokens_added(tokens, new_start, snippet_counts),
        "training": history.as_dict(),
        "settings": settings,
        **sections,
    }


def write_report(path: str | Path, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str), encoding="utf-8")


def read_report(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
