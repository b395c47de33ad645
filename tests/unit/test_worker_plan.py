"""The plan the driver ships to Ray Train's workers names the model as each worker's node can
resolve it: a GGUF or bundled model is materialised in each node's own cache (the driver's
copy is on the driver's node only), a local directory by its absolute path."""

from pathlib import Path

from transformers import AutoTokenizer

from tests.helpers import WORDS
from tokdist_ray.config import DistillationConfig, DistributedConfig
from tokdist_ray.export.gguf import export_gguf
from tokdist_ray.training.ray_trainer import _plan
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import load_model


def plan_for(model: str, tmp_path: Path, expansion):
    return _plan(model, str(tmp_path / "snippets"), expansion, None, tmp_path / "rows", DistillationConfig(),
                 DistributedConfig(), "first_piece", "fvt", None, None)


def test_a_worker_on_another_node_materialises_a_gguf_model_in_its_own_cache(tiny_model_dir, tmp_path, monkeypatch):
    expansion = expand_with_merges(AutoTokenizer.from_pretrained(tiny_model_dir(tied=False)), WORDS)
    gguf = export_gguf(tiny_model_dir(tied=False), tmp_path / "tiny.gguf", "f32")
    monkeypatch.setenv("TOKDIST_RAY_CACHE", str(tmp_path / "driver-node"))
    plan = plan_for(str(gguf), tmp_path, expansion)
    assert plan.model_path == str(gguf)  # not the driver's materialised copy
    assert (tmp_path / "driver-node" / "hf-from-gguf").is_dir()  # checked on the driver

    monkeypatch.setenv("TOKDIST_RAY_CACHE", str(tmp_path / "worker-node"))  # another node: another cache
    model = load_model(plan.model_path)  # as worker.parallel_distiller loads it
    assert model.config.vocab_size == load_model(str(tiny_model_dir(tied=False))).config.vocab_size
    assert len(list((tmp_path / "worker-node" / "hf-from-gguf").glob("*/config.json"))) == 1  # its own copy


def test_a_relative_model_directory_reaches_the_workers_absolute(tiny_model_dir, tmp_path, monkeypatch):
    model_dir = tiny_model_dir(tied=False)
    expansion = expand_with_merges(AutoTokenizer.from_pretrained(model_dir), WORDS)
    monkeypatch.chdir(model_dir.parent)  # Ray Train starts workers in directories of their own
    assert plan_for(model_dir.name, tmp_path, expansion).model_path == str(model_dir.resolve())
    assert plan_for("org/some-model", tmp_path, expansion).model_path == "org/some-model"  # a hub id as given
