"""Weight files in safetensors: a model folder's shards, which loading, the export and
the GGUF export all read, and the file of the new rows, which training and the export
both write (fp32, "input" and, for untied models, "output")."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def shards_of(model_dir: str | Path) -> list[str] | None:
    """The safetensors files of a local HF model directory, or None when it has none."""
    root = Path(model_dir)
    if (root / INDEX).is_file():
        return sorted(set(json.loads((root / INDEX).read_text())["weight_map"].values()))
    return [SINGLE] if (root / SINGLE).is_file() else None


def write_rows(path: Path, rows: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().float().cpu().contiguous() for k, v in rows.items()}, str(path))


def read_rows(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
