"""The streamed export (one original shard at a time) equals loading, expanding and saving
the whole model, tensor for tensor, bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from tokdist_ray.export.hf import expand_model
from tokdist_ray.export.streamed import export_streamed
from tokdist_ray.vocab.weights import shards_of


def tensors(directory) -> dict[str, torch.Tensor]:
    return {name: t for shard in shards_of(directory) for name, t in load_file(directory / shard).items()}


@pytest.mark.parametrize("tied,output_rows,sharded,grow", [
    (False, True, True, False), (False, False, False, True), (True, False, True, True), (True, True, False, False),
])
def test_the_streamed_export_equals_the_whole_model_export(tiny_model_dir, tmp_path, tied, output_rows, sharded, grow):
    original = tmp_path / "original"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tied=tied))
    # a sharded checkpoint, as large models come; or one file
    model.save_pretrained(original, max_shard_size="40KB" if sharded else "10GB")
    assert len(shards_of(original)) > 1 if sharded else shards_of(original) == ["model.safetensors"]
    vocab, hidden = model.get_input_embeddings().weight.shape
    new_start = vocab - 3 if not grow else vocab  # into spare rows, or growing the tables
    generator = torch.Generator().manual_seed(0)
    rows = {"input": torch.randn(5, hidden, generator=generator)}
    if output_rows:
        rows["output"] = torch.randn(5, hidden, generator=generator)

    whole = AutoModelForCausalLM.from_pretrained(original, dtype="auto")
    expand_model(whole, new_start, rows["input"], rows.get("output"))
    whole.save_pretrained(tmp_path / "whole")
    export_streamed(original, new_start, rows, tmp_path / "streamed")

    expected, got = tensors(tmp_path / "whole"), tensors(tmp_path / "streamed")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) and expected[name].dtype == got[name].dtype for name in expected)
    configs = [AutoConfig.from_pretrained(tmp_path / run) for run in ("whole", "streamed")]
    assert [(c.vocab_size, c.tie_word_embeddings) for c in configs] == [(configs[0].vocab_size, tied and not output_rows)] * 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert torch.equal(loaded.get_input_embeddings().weight[new_start:new_start + 5], rows["input"])
    if sharded:
        index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
