"""What can be known about a run before any work, checked up front: one line each.

Config values are checked where the config is built (config.py, job/config.py). This
module checks what needs the file system, the model's config or the machine: the places
a run writes and their free space, whether the model's files are whole and whether it
needs remote code, the target layer against the model's depth, and a local run's workers
against this machine's CPUs. The API and the job call the same checks before they mine,
start Ray or load weights.

Layering (pyproject.toml's import-linter contract): preflight sits below training, data and
the export, above vocab, since training calls it; it imports only vocab and the base
modules, so it names the files it looks for itself.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from tokdist_ray.errors import ConfigError

GGUF_BYTES = {"f16": 2, "bf16": 2, "f32": 4}  # per weight, of output.gguf_dtype
# The Hugging Face format's weight files (transformers' SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# The file only a finished export has (export.model.ROWS, the export's atomic_directory
# marker); tests/unit/test_layering.py checks that the two names agree
EXPORT_MARKER = "new_rows.safetensors"


def check_writable_dir(key: str, path: str | os.PathLike) -> None:
    """`path` is a directory, or can be made one, that this process can write."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a directory; name a directory (it is created if missing)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}: {path} lies under {existing}, which is a file; name a directory elsewhere")
    try:  # a real write, as root passes permission checks and a read-only mount passes os.access
        os.rmdir(tempfile.mkdtemp(prefix=".tokdist-probe-", dir=existing))
    except OSError as e:
        raise ConfigError(
            f"{key}: {path} cannot be written ({existing}: {e.strerror or e}); name a writable directory"
        ) from None


def model_config(model: str, trust_remote_code: bool = False):
    """The model's config (config.json only, no weights), its files checked first, refusing
    remote code unless asked."""
    from tokdist_ray.vocab.models import load_model_config

    check_model_files(model)
    try:
        return load_model_config(model, trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ConfigError(
            f"model {model!r} needs its own Python code to load (its config names custom classes); "
            "if you trust that code, pass trust_remote_code=True (--trust_remote_code true in a job)"
        ) from None


def check_model_files(model: str) -> None:
    """A local model's config.json is a JSON object and its safetensors shards are whole: a
    download or copy cut short failed only when a worker loaded it, after mining, naming no file."""
    directory = _local_model_dir(model)
    if directory is None:
        return
    _json_object(directory / "config.json")
    for shard in model_shards(directory):
        safetensors_tensors(shard)


def _local_model_dir(model: str) -> Path | None:
    """The HF directory a model name resolves to (a GGUF is materialised); None for a hub id."""
    from tokdist_ray.vocab.models import resolve_model_path

    path = Path(resolve_model_path(model))
    return path if path.is_dir() else None


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise ConfigError(f"model file {path} is not valid JSON ({e}); repair it or download the model again") from None
    if not isinstance(value, dict):
        raise ConfigError(f"model file {path} must hold a JSON object, not {type(value).__name__}; "
                          "repair it or download the model again")
    return value


def model_shards(directory: Path) -> list[Path]:
    """A local model's safetensors files: its index's, or model.safetensors; none for a
    checkpoint in another format."""
    if not (directory / INDEX).is_file():
        return [directory / SINGLE] if (directory / SINGLE).is_file() else []
    weight_map = _json_object(directory / INDEX).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConfigError(f"model file {directory / INDEX} has no weight_map; download the model again")
    shards = [directory / name for name in sorted(set(weight_map.values()))]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ConfigError(f"model directory {directory} lacks {missing[0]}"
                          f"{f' and {len(missing) - 1} more shards' if len(missing) > 1 else ''}, named in {INDEX}; "
                          "download or copy the model again")
    return shards


def safetensors_tensors(path: Path) -> list[dict]:
    """The tensor entries ({dtype, shape, data_offsets}) of a safetensors file's header,
    checked against the file's size: 8 bytes (the header's length, little-endian), the
    header (JSON), then the data, which must reach the largest end offset."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or 8 + length > size:
            raise _truncated(path, size, max(8, 8 + length))
        try:
            header = json.loads(f.read(length))
            tensors = [entry for name, entry in header.items() if name != "__metadata__"]
            end = max((int(entry["data_offsets"][1]) for entry in tensors), default=0)
        except (ValueError, AttributeError, TypeError, KeyError, IndexError):  # not the format's JSON header
            raise ConfigError(f"model file {path} is not a safetensors file (its header is not valid); "
                              "download or copy the model again") from None
    if 8 + length + end > size:
        raise _truncated(path, size, 8 + length + end)
    return tensors


def _truncated(path: Path, size: int, needed: int) -> ConfigError:
    return ConfigError(f"model file {path} is truncated: it has {size} bytes of the {needed} its header describes; "
                      "download or copy the model again")


def check_export_space(key: str, out_dir: str | os.PathLike, model: str, gguf_dtype: str | None = None) -> None:
    """The export writes a local model's safetensors shards again into `out_dir`, plus a
    margin of its largest tensor (untying a tied model writes its table twice; new rows
    grow it), and with GGUF its weights once more in `gguf_dtype`. A full disk found now
    costs nothing; found after training, it lost the run. Not checked over an earlier
    export: a rerun may reuse it, writing nothing, which only the stages know."""
    directory = _local_model_dir(model)
    shards = model_shards(directory) if directory is not None else []
    out = Path(out_dir).expanduser()
    if not shards or (out / EXPORT_MARKER).is_file():
        return
    tensors = [entry for shard in shards for entry in safetensors_tensors(shard)]
    needed = sum(s.stat().st_size for s in shards) + max(map(_data_bytes, tensors), default=0)
    if gguf_dtype is not None:
        needed += sum(math.prod(t["shape"]) for t in tensors) * GGUF_BYTES[gguf_dtype]
    free = shutil.disk_usage(next(p for p in (out, *out.parents) if p.exists())).free
    if free < needed:
        raise ConfigError(
            f"{key}: the export into {out} needs about {_gb(needed)} ({needed} bytes: the model's safetensors shards"
            f"{', its GGUF' if gguf_dtype else ''} and a margin), and its filesystem has {_gb(free)} ({free} bytes) "
            "free; free space there or name a directory on a larger disk"
        )


def _data_bytes(entry: dict) -> int:
    start, end = entry["data_offsets"]
    return end - start


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_target_layer(target_layer: int, n_layers: int) -> None:
    """Hidden states 0..n_layers (0: the embeddings); negative counts from the last."""
    if not -(n_layers + 1) <= target_layer <= n_layers:
        raise ConfigError(
            f"training.target_layer {target_layer} is out of range for a model with {n_layers} layers; "
            f"use -1 (the last) or 0..{n_layers}"
        )


def check_model(model: str, target_layer: int, trust_remote_code: bool = False) -> None:
    config = model_config(model, trust_remote_code)
    check_target_layer(target_layer, config.get_text_config().num_hidden_layers)


def check_local_workers(num_workers: int, cpus_per_worker: float | str, use_gpu: bool) -> None:
    """A local Ray instance has this machine's CPUs and GPUs and no autoscaler: workers it
    cannot place would make Ray Train wait for ever. (A cluster may grow; it is not checked.)
    "auto" CPUs are at least 1 each."""
    cpus = os.cpu_count() or 1
    cpus_per_worker = 1 if cpus_per_worker == "auto" else cpus_per_worker
    if num_workers * cpus_per_worker > cpus:
        raise ConfigError(
            f"distributed.num_workers {num_workers} x cpus_per_worker {cpus_per_worker:g} needs "
            f"{num_workers * cpus_per_worker:g} CPUs, and this machine has {cpus}; lower num_workers, "
            "or submit the job to a cluster that has them (ray job submit, RAY_ADDRESS)"
        )
    if use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if num_workers > gpus:
            raise ConfigError(
                f"distributed.num_workers {num_workers} with use_gpu needs {num_workers} GPUs, and this machine "
                f"has {gpus}; lower num_workers, set use_gpu false, or submit the job to a GPU cluster"
            )
