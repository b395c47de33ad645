"""What can be known about a run before any work, checked up front: one line each.

Config values are checked where the config is built (config.py, job/config.py). This
module checks what needs the file system, the model's config or the machine: the places
a run writes, whether the model needs remote code, the target layer against the model's
depth, and a local run's workers against this machine's CPUs. The API and the job call
the same checks before they mine, start Ray or load weights.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tokdist_ray.errors import ConfigError


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
    """The model's config (config.json only, no weights), refusing remote code unless asked."""
    from tokdist_ray.vocab.models import load_model_config

    try:
        return load_model_config(model, trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ConfigError(
            f"model {model!r} needs its own Python code to load (its config names custom classes); "
            "if you trust that code, pass trust_remote_code=True (--trust_remote_code true in a job)"
        ) from None


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


def check_local_workers(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """A local Ray instance has this machine's CPUs and GPUs and no autoscaler: workers it
    cannot place would make Ray Train wait for ever. (A cluster may grow; it is not checked.)"""
    cpus = os.cpu_count() or 1
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
