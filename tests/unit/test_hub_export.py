"""A model named by hub id is exported shard by shard from the hub cache, as a local
directory is, never by loading it whole; a hub model with pickle weights alone is refused.
The hub is a cache laid out here as huggingface_hub lays out its own; no test reaches it."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import WORDS
from tokdist_ray.errors import ModelNotFoundError
from tokdist_ray.export import model as export_model
from tokdist_ray.export.hf import expand_model
from tokdist_ray.export.model import save_model
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.weights import INDEX, shards_of

REPO = "tiny-org/tiny-llama"
COMMIT = hashlib.sha1(b"tiny-llama").hexdigest()
PICKLES = {"pytorch_model.bin": 200_000, "training_args.bin": 5_000}  # on the hub, never in the cache
REPORT = {"model": REPO}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("this test may not reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline. The hub library reads both settings at import, so its
    constants are patched as well as the environment."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def whole_model_load_refused(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the export loaded the whole model")

    monkeypatch.setattr(export_model, "load_model", refuse)
    monkeypatch.setattr(export_model, "expand_model", refuse)


def cache_repo(cache: Path, files: dict[str, bytes], listed: dict[str, int] | None = None) -> None:
    """REPO at COMMIT in the hub cache's layout: the `files` as blobs the snapshot links to,
    refs/main naming the commit, and with `listed`, the commit's tree listing (the files and
    the `listed` ones, absent here). Offline, snapshot_download refuses a snapshot that lacks
    a listed file its patterns ask for, so a listed pickle file tells whether they ask for it."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    if listed is not None:
        sizes = {**{name: len(data) for name, data in files.items()}, **listed}
        tree = {name: {"size": size, "blob_id": hashlib.sha1(name.encode()).hexdigest()} for name, size in sizes.items()}
        (repo / "trees").mkdir()
        (repo / "trees" / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": tree}))


def hub_repo(tiny_model_dir, tmp_path, sharded: bool) -> Path:
    """The tiny model as a hub repo holds it: safetensors (sharded, as large models come), tokenizer."""
    repo = tmp_path / "repo"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir(tied=False)).save_pretrained(
        repo, max_shard_size="40KB" if sharded else "10GB")
    AutoTokenizer.from_pretrained(tiny_model_dir(tied=False)).save_pretrained(repo)
    assert (len(shards_of(repo)) > 1) == sharded
    return repo


def expansion_and_rows(repo: Path):
    expansion = expand_with_merges(AutoTokenizer.from_pretrained(repo), WORDS)
    generator = torch.Generator().manual_seed(0)
    rows = {side: torch.randn(len(expansion.tokens), 64, generator=generator) for side in ("input", "output")}
    return expansion, rows


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {name: t for shard in shards_of(directory) for name, t in load_file(directory / shard).items()}


def contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("sharded", [True, False])
def test_a_hub_model_is_exported_shard_by_shard_from_the_hub_cache(tiny_model_dir, tmp_path, hub_cache,
                                                                   whole_model_load_refused, sharded):
    repo = hub_repo(tiny_model_dir, tmp_path, sharded)
    cache_repo(hub_cache, {p.name: p.read_bytes() for p in repo.iterdir()}, listed=PICKLES)
    expansion, rows = expansion_and_rows(repo)
    save_model(str(repo), expansion, rows, tmp_path / "from-dir", REPORT)  # streamed as well
    save_model(REPO, expansion, rows, tmp_path / "from-hub", REPORT)

    expected, got = tensors(tmp_path / "from-dir"), tensors(tmp_path / "from-hub")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) and expected[name].dtype == got[name].dtype for name in expected)
    assert contents(tmp_path / "from-hub") == contents(tmp_path / "from-dir")  # config, tokenizer, report too
    assert not any(p.is_symlink() for p in (tmp_path / "from-hub").iterdir())  # copies, not links into the cache


@pytest.mark.parametrize("cached", ["config only", "some shards"])
def test_offline_a_hub_model_the_cache_lacks_weights_of_is_refused(tiny_model_dir, tmp_path, hub_cache,
                                                                   whole_model_load_refused, cached):
    # from_pretrained fetched the config (a preflight reads it), or a download stopped midway
    repo = hub_repo(tiny_model_dir, tmp_path, sharded=True)
    names = ["config.json"] + ([INDEX, shards_of(repo)[0]] if cached == "some shards" else [])
    cache_repo(hub_cache, {name: (repo / name).read_bytes() for name in names})
    expansion, rows = expansion_and_rows(repo)
    with pytest.raises(ModelNotFoundError, match=r"HF_HUB_OFFLINE=1 .*`hf download tiny-org/tiny-llama ") as refused:
        save_model(REPO, expansion, rows, tmp_path / "out", REPORT)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_a_hub_model_with_pickle_weights_alone_is_refused_unless_it_is_loaded_already(tiny_model_dir, tmp_path,
                                                                                     hub_cache, monkeypatch,
                                                                                     whole_model_load_refused):
    # Online: the hub cannot be reached here (no_network), so the hub library serves the cache,
    # which holds what the export's patterns fetch of a repo whose weights are pickle alone.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    repo = hub_repo(tiny_model_dir, tmp_path, sharded=False)
    cache_repo(hub_cache, {"config.json": (repo / "config.json").read_bytes()}, listed=PICKLES)
    expansion, rows = expansion_and_rows(repo)
    with pytest.raises(ModelNotFoundError, match=r"no complete set of safetensors weights.*no pickle.*convert it"):
        save_model(REPO, expansion, rows, tmp_path / "out", REPORT)
    assert not (tmp_path / "out").exists()

    # a caller that holds the expanded model already (the Python API) has it saved: nothing is loaded
    model = expand_model(AutoModelForCausalLM.from_pretrained(repo), expansion.new_start, rows["input"], rows["output"])
    save_model(REPO, expansion, rows, tmp_path / "out", REPORT, model=model)
    assert tensors(tmp_path / "out").keys() == {name for name, _ in model.named_parameters()}


def test_offline_a_hub_model_not_in_the_cache_is_refused_in_one_line(tiny_model_dir, tmp_path, hub_cache,
                                                                    whole_model_load_refused):
    expansion, rows = expansion_and_rows(tiny_model_dir(tied=False))
    with pytest.raises(ModelNotFoundError, match=r"model 'tiny-org/tiny-llama' was not found locally") as refused:
        save_model(REPO, expansion, rows, tmp_path / "out", REPORT)
    assert "\n" not in str(refused.value)
