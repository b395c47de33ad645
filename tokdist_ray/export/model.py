"""The export stage's work: the expanded model's folder, written whole or not at all.

    save_model     the expanded model and tokenizer (streamed from the original shards
                   where the model has them: hf.py, streamed.py), its safetensors index
                   (written for one model.safetensors too), report.json,
                   new_rows.safetensors and, when asked, model.gguf (gguf.py)
    check_out_dir  before any work: the folder is one save_model may replace
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tokdist_ray.atomic import atomic_directory, check_replaceable, write_json
from tokdist_ray.errors import OutputWriteError, TokdistError
from tokdist_ray.export.gguf import GGUF_FILE, GgufOptions, export_gguf
from tokdist_ray.export.hf import expand_model, save_expanded
from tokdist_ray.export.streamed import export_streamed
from tokdist_ray.vocab.merges import MergeExpansion
from tokdist_ray.vocab.models import load_model, weights_dir
from tokdist_ray.vocab.weights import INDEX, SINGLE, shards_of, write_rows

log = logging.getLogger("tokdist_ray")

ROWS = "new_rows.safetensors"  # the whole rows, as the export writes them: the marker of a finished export


def save_model(model_path: str, expansion: MergeExpansion, rows: dict[str, torch.Tensor], out_dir: str | Path,
               report: dict, model=None, gguf: GgufOptions | None = None) -> Path:
    """The expanded model and tokenizer, report.json, and the new rows alone
    (new_rows.safetensors: "input" and, for untied models, "output", fp32). Written from
    the original safetensors shards, one at a time, when the model has them (a hub model's
    from the hub cache; no process holds the whole model); else `model` (expanded already)
    or the loaded local model is saved (a hub model without safetensors is refused: no pickle).
    With `gguf`, also the same model as one GGUF file for llama.cpp, model.gguf, written
    from the exported directory (streamed too). The export replaces an earlier one at
    `out_dir` whole or not at all (atomic_directory): a kill or a failure, a full disk
    say, leaves the earlier one as it was, and nothing of it stays beside the new one."""
    rows = {name: row.detach().float().cpu().contiguous() for name, row in rows.items()}
    model_dir = weights_dir(model_path, loaded=model is not None)
    streamed = bool(shards_of(model_dir))
    if not streamed and model is None:
        model = expand_model(load_model(str(model_dir), dtype="auto"), expansion.new_start, rows["input"],
                             rows.get("output"))
    out = Path(out_dir)
    try:
        with atomic_directory(out, marker=ROWS) as partial:
            if streamed:
                export_streamed(model_dir, expansion.new_start, rows, partial)
                expansion.tokenizer.save_pretrained(partial)
                write_json(partial / "report.json", report)
            else:
                save_expanded(model, expansion.tokenizer, partial, report)
            index_single_file(partial)
            write_rows(partial / ROWS, rows)
            if gguf is not None:
                export_gguf(partial, partial / GGUF_FILE, gguf.dtype, gguf.pre)
    except (OSError, SafetensorError) as e:
        if isinstance(e, TokdistError) or not (isinstance(e, OSError) or "I/O error" in str(e)):
            raise  # a refusal with its own message, or a bug
        raise _export_write_error(out, e, _weights_bytes(model_dir, model), gguf is not None) from e
    log.info("saved the expanded model to %s", out)
    return out


def index_single_file(directory: Path) -> None:
    """model.safetensors.index.json for a model saved as one model.safetensors, as sharded
    models have one. Without an index, vLLM (default_loader.py) loads every *.safetensors in
    the folder, new_rows.safetensors too, and refuses its tensors ("There is no module or
    parameter named 'input'"); with one it loads only the files the index names.
    transformers reads model.safetensors as before (it prefers it to the index)."""
    if (directory / INDEX).is_file() or not (directory / SINGLE).is_file():
        return
    with safe_open(directory / SINGLE, framework="pt") as f:
        names = sorted(f.keys())
    with open(directory / SINGLE, "rb") as f:  # the tensors' bytes: the file less its 8-byte length and header
        header = int.from_bytes(f.read(8), "little")
    total = (directory / SINGLE).stat().st_size - 8 - header
    index = {"metadata": {"total_size": total}, "weight_map": dict.fromkeys(names, SINGLE)}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def check_out_dir(out_dir: str | Path) -> None:
    """Before any work: `out_dir` is one save_model may replace (new, empty, or an
    earlier export: it has new_rows.safetensors; not a mount point)."""
    check_replaceable(out_dir, ROWS)


def _weights_bytes(model_dir: str, model) -> int:
    if model is not None:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return sum((Path(model_dir) / shard).stat().st_size for shard in shards_of(model_dir))


def _export_write_error(out: Path, error: Exception, weights: int, gguf: bool) -> OutputWriteError:
    """What failed, and the room an export needs: the new one is written in full beside
    the earlier one before it replaces it."""
    free = shutil.disk_usage(next(p for p in (out, *out.parents) if p.exists())).free
    needed = f"{_size(weights)} for the weights" + (", and about as much for the GGUF" if gguf else "")
    return OutputWriteError(
        f"cannot write the export {out}: {error}. It needs {needed}, beside any earlier export until it "
        f"replaces it, and {_size(free)} are free there; {out} is left as it was"
    )


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.3g} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.3g} MB"
