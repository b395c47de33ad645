"""Where the generating model comes from, on the driver and on the node that runs an engine.

The driver never resolves the model for the engines: it hands them the name the user gave
(`bundled:smollm2`, a .gguf file, a local directory, a hub id, an s3:// or gs:// URI), and
each engine resolves it on its own node (`engine_model_path`): a bundled or GGUF model is
materialised there, a hub id or URI passes through (vLLM and Ray download those on the
node), and a local path that the node lacks fails with an error that says what to do. The
driver reads the model's generation_config.json (`generation_config`), for the stop ids,
and gives Ray's vLLM processor a name its own driver-side lookup can read (`ray_model_source`).
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

from tokdist_ray.errors import ModelNotFoundError
from tokdist_ray.storage import is_uri, location
from tokdist_ray.vocab.models import BUNDLED_SMOLLM2, resolve_model_path

log = logging.getLogger("tokdist_ray")

ON_EVERY_NODE = ("a model for vLLM must be reachable from every GPU node: give a hub id (org/name), an s3:// or "
                 "gs:// URI, or a path on storage that every node mounts at the same place")


def is_gguf_source(model_path: str) -> bool:
    """A spec whose weights must be converted before any engine can load them."""
    path = Path(str(model_path)).expanduser()
    if str(model_path).startswith("bundled:") or path.suffix == ".gguf":
        return True
    return path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.gguf"))


def engine_model_path(model_path: str) -> str:
    """What an engine on this node loads for `model_path`: hub ids and URIs as given, local
    paths as this node sees them (GGUF and bundled models materialised here)."""
    model_path = str(model_path)
    if is_uri(model_path):
        return model_path
    try:
        return resolve_model_path(model_path)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"on node {socket.gethostname()}: {e}; {ON_EVERY_NODE}") from e


def ray_model_source(model_path: str) -> str:
    """The `model_source` of Ray's vLLM processor: the model as this driver sees it. Ray's
    build_processor reads the model's config on the driver (download_model_files passes
    anything but an s3:// or gs:// URI through as it is, then AutoConfig.from_pretrained):
    under the user's name a .gguf file would be read whole as JSON (gigabytes into the
    driver) and `bundled:` is no name the hub allows, while the resolved directory is read
    as any. No conversion happens here: the driver loaded its tokenizer from the same name
    (load_tokenizer), which materialised a GGUF or bundled model on this node already. A
    name this driver cannot resolve (a path only the GPU nodes have) goes as it is; Ray's
    lookup then fails and only warns. The engines never get this path: each resolves the
    user's name on its own node (engine_model_path)."""
    try:
        return engine_model_path(model_path)
    except ModelNotFoundError:
        return str(model_path)


def generation_config(model_path: str):
    """The model's GenerationConfig for its stop ids, read without weights: None for GGUF
    and bundled models (their generation config is derived from the model config, whose EOS
    is the tokenizer's) and where the model has none."""
    from transformers import GenerationConfig

    model_path = str(model_path)
    if model_path == BUNDLED_SMOLLM2 or is_gguf_source(model_path):
        return None
    if is_uri(model_path):
        fs, root = location(model_path)
        try:
            with fs.open_input_stream(f"{root.rstrip('/')}/generation_config.json") as f:
                return GenerationConfig.from_dict(json.loads(f.read()))
        except (FileNotFoundError, OSError):
            return None
    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the tokenizer's EOS is all there is
        return None
