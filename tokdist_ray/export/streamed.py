"""The expanded model written from the original safetensors shards, one shard at a time:
only the tensors that change (the input embeddings, the LM head) are rewritten, so no
process ever holds the whole model. The result equals expand_model + save_pretrained
tensor for tensor, bit for bit (tests/unit/test_streamed_export.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tokdist_ray.vocab.weights import INDEX, SINGLE

CARRIED = ("generation_config.json",)  # written by save_pretrained too


def embedding_names(config) -> tuple[str, str | None]:
    """(input embedding, LM head) parameter names, from the architecture on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = {id(m): name for name, m in model.named_modules()}  # tied: one tensor, two modules
    head = model.get_output_embeddings()
    head_name = f"{modules[id(head)]}.weight" if head is not None else None
    return f"{modules[id(model.get_input_embeddings())]}.weight", head_name


def export_streamed(model_dir: str | Path, new_start: int, rows: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write `model_dir`'s model with the new rows ("input", and "output" for an untied
    head) at ids new_start.. into `out_dir`: the tables grow only when they lack the rows
    (the added rows are all new ones), a tied model given output rows is untied (its head
    a copy of the expanded input table with the output rows written in)."""
    from transformers import AutoConfig

    model_dir, out = Path(model_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config()
    embed_name, head_name = embedding_names(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    untie = tied and "output" in rows
    needed = new_start + len(rows["input"])
    index, total = _index(model_dir), 0
    for shard in sorted(set(index["weight_map"].values())):
        tensors = _read(model_dir / shard)
        if embed_name in tensors:
            tensors[embed_name] = _with_rows(tensors[embed_name], new_start, needed, rows["input"])
            if untie:
                tensors[head_name] = _with_rows(tensors[embed_name], new_start, needed, rows["output"])
                index["weight_map"][head_name] = shard
        if not tied and head_name in tensors:
            output = rows.get("output", torch.zeros_like(rows["input"]))
            tensors[head_name] = _with_rows(tensors[head_name], new_start, needed, output)
        save_file(tensors, out / shard, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors  # one shard at a time
    if max(needed, text.vocab_size) != text.vocab_size:
        text.vocab_size = needed
    if untie:
        for section in {id(c): c for c in (config, text)}.values():
            section.tie_word_embeddings = False
    config.save_pretrained(out)
    if (model_dir / INDEX).is_file():
        index["metadata"] = {**index.get("metadata", {}), "total_size": total}
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for name in CARRIED:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    return out


def _index(model_dir: Path) -> dict:
    if (model_dir / INDEX).is_file():
        return json.loads((model_dir / INDEX).read_text())
    with safe_open(model_dir / SINGLE, framework="pt") as f:
        return {"weight_map": {name: SINGLE for name in f.keys()}}


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _with_rows(table: torch.Tensor, new_start: int, needed: int, rows: torch.Tensor) -> torch.Tensor:
    """A new table: `table` (grown when it lacks rows) with `rows` at new_start.. (the
    caller may pass the same table twice: untying writes the head from the input table)."""
    if table.shape[0] >= needed:
        grown = table.clone()
    else:
        grown = torch.cat([table, table.new_zeros(needed - table.shape[0], table.shape[1])])
    grown[new_start:needed] = rows.to(grown.dtype)
    return grown
