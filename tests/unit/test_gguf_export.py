"""The GGUF export: an expanded model read back by transformers' GGUF loader equals the HF
export (weights, logits, tokenizer), and what cannot be exported is a clear error."""

from __future__ import annotations

import json
import math

import gguf
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tests.helpers import SENTENCES, WORDS
from tokdist_ray.errors import ExportError
from tokdist_ray.export import gguf as gguf_export
from tokdist_ray.export.gguf import GGUF_FILE, GgufOptions, check_exportable, export_gguf
from tokdist_ray.export.model import save_model
from tokdist_ray.vocab.merges import expand_with_merges

HELD_OUT = "A Schmetterling rested on the roof of the Krankenwagen while 23 children watched from the bridge."


def load_gguf_model(directory, name=GGUF_FILE):
    from transformers import GgufConfig

    # dequantize=True: a dense model, as models.py materialises GGUF files (see there)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                                quantization_config=GgufConfig(dequantize=True))


def assert_same_weights(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def metadata(path) -> dict:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields | {"tensors": {t.name: (t.tensor_type.name, tuple(int(s) for s in t.shape)) for t in reader.tensors}}


# --- the real model -------------------------------------------------------------------------


def test_an_expanded_smollm2_reads_back_from_gguf_as_its_hf_export(smollm2_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    expansion = expand_with_merges(tokenizer, WORDS)  # the two words and the intermediates their merges need
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as f:
        std = f.get_slice("model.embed_tokens.weight")[:1000].std()
    rows = {"input": torch.randn(len(expansion.tokens), 576, generator=torch.Generator().manual_seed(0)) * std}
    out = save_model(str(smollm2_dir), expansion, rows, tmp_path / "model", {"model": "bundled:smollm2"},
                     gguf=GgufOptions("f32"))

    fields = metadata(out / GGUF_FILE)
    n_vocab = len(expansion.tokenizer)
    assert (fields["general.architecture"], fields["tokenizer.ggml.model"]) == ("llama", "gpt2")
    # the bundled SmolLM2 came out of a GGUF, and transformers dropped its digit split there: GPT-2's regex
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["llama.vocab_size"] == len(fields["tokenizer.ggml.tokens"]) == n_vocab
    assert fields["tokenizer.ggml.tokens"][expansion.new_start:] == [
        expansion.tokenizer.convert_ids_to_tokens(i) for i in range(expansion.new_start, n_vocab)]
    assert fields["tokenizer.ggml.merges"][-len(expansion.merges):] == [f"{a} {b}" for a, b in expansion.merges]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["general.name"] == "bundled:smollm2"
    assert "output.weight" not in fields["tensors"]  # tied: llama.cpp reads the head from token_embd
    assert fields["tensors"]["token_embd.weight"] == ("F32", (576, n_vocab))

    exported, from_gguf = AutoModelForCausalLM.from_pretrained(out), load_gguf_model(out)
    assert from_gguf.config.tie_word_embeddings and from_gguf.config.vocab_size == n_vocab
    embeddings = from_gguf.get_input_embeddings().weight
    assert torch.equal(embeddings, exported.get_input_embeddings().weight)  # old rows and new, bit for bit
    assert torch.equal(embeddings[expansion.new_start:], rows["input"])
    expected, got = exported.state_dict(), from_gguf.state_dict()
    assert_same_weights(expected, got)  # q/k unpermuted

    gguf_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=GGUF_FILE)
    ids = expansion.tokenizer(HELD_OUT)["input_ids"]
    assert set(range(expansion.new_start, expansion.new_start + len(WORDS))) <= set(ids)
    for text in [HELD_OUT, *SENTENCES, "<|im_start|>user\nKrankenwagens 1234<|im_end|>"]:
        assert gguf_tokenizer(text)["input_ids"] == expansion.tokenizer(text)["input_ids"], text
    with torch.no_grad():
        logits = [m(torch.tensor([ids])).logits for m in (exported, from_gguf)]
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)


# --- tiny models: dtypes, the head, rope scaling -------------------------------------------


def tiny_llama_dir(tmp_path, tokenizer_dir, tied: bool, shard_size: str = "10GB", **config):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=len(tokenizer) + 3, max_position_embeddings=256,
                    tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**settings | config))  # 3 spare rows past the tokenizer, as models pad
    out = tmp_path / "tiny"
    model.save_pretrained(out, max_shard_size=shard_size)
    tokenizer.save_pretrained(out)
    return out, model


@pytest.mark.parametrize("dtype,tied,sharded", [("f32", False, False), ("f16", False, True), ("bf16", True, False)])
def test_tiny_llama_round_trips_in_each_dtype(tiny_tokenizer_dir, tmp_path, dtype, tied, sharded):
    directory, model = tiny_llama_dir(tmp_path, tiny_tokenizer_dir(bos=True), tied, "40KB" if sharded else "10GB")
    assert (directory / "model.safetensors.index.json").is_file() == sharded  # large models come in shards
    export_gguf(directory, directory / GGUF_FILE, dtype)

    fields = metadata(directory / GGUF_FILE)
    kind = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[dtype]
    assert fields["tensors"]["blk.0.attn_q.weight"][0] == kind
    assert fields["tensors"]["blk.0.attn_norm.weight"][0] == "F32"
    assert ("output.weight" in fields["tensors"]) == (not tied)
    assert fields["tokenizer.ggml.add_bos_token"] is True  # the tiny tokenizer prepends <s>, like Llama 3
    assert fields["tokenizer.ggml.token_type"][-3:] == [gguf.TokenType.UNUSED] * 3  # the spare rows
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)

    got = load_gguf_model(directory).state_dict()
    expected = model.state_dict()
    assert expected.keys() == got.keys()
    cast = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor.to(cast).float() if tensor.dim() > 1 else tensor), name


def test_vocabulary_rows_padded_when_asked_are_zero_rows_of_unused_tokens(tiny_tokenizer_dir, tmp_path):
    directory, model = tiny_llama_dir(tmp_path, tiny_tokenizer_dir(bos=True), tied=False)
    rows = model.config.vocab_size
    padded = -(-rows // 64) * 64
    export_gguf(directory, directory / GGUF_FILE, "f32", vocab_multiple=64)
    fields = metadata(directory / GGUF_FILE)
    assert fields["llama.vocab_size"] == fields["tensors"]["output.weight"][1][1] == padded > rows
    assert fields["tokenizer.ggml.token_type"][rows - 3:] == [gguf.TokenType.UNUSED] * (padded - rows + 3)
    got, expected = load_gguf_model(directory).state_dict(), model.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[name][:rows], expected[name]) and not got[name][rows:].any(), name
    with pytest.raises(ExportError, match="vocab_multiple"):
        export_gguf(directory, tmp_path / "x.gguf", vocab_multiple=0)


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_tiny_mistral_and_qwen2_round_trip(tiny_tokenizer_dir, tmp_path, kind):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[kind]
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=False))
    torch.manual_seed(0)
    model = model_class(config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                                     tie_word_embeddings=kind == "qwen2"))
    directory = tmp_path / "tiny"  # general.name: transformers reads a llama GGUF named "mistral..." as a mistral one
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    export_gguf(directory, directory / GGUF_FILE, "f32")

    fields = metadata(directory / GGUF_FILE)
    arch = {"mistral": "llama", "qwen2": "qwen2"}[kind]  # llama.cpp runs Mistral as llama
    assert fields["general.architecture"] == arch and f"{arch}.context_length" in fields
    assert ("blk.0.attn_q.bias" in fields["tensors"]) == (kind == "qwen2")  # Qwen2's q/k/v have biases
    assert fields["tokenizer.ggml.add_bos_token"] is False  # this tokenizer adds none
    expected, got = model.state_dict(), load_gguf_model(directory).state_dict()
    assert_same_weights(expected, got)


def test_added_tokens_are_user_defined_and_spelled_as_in_raw_text(tiny_tokenizer_dir, tmp_path):
    directory, _ = tiny_llama_dir(tmp_path, tiny_tokenizer_dir(bos=True), False)
    expansion = expand_with_merges(AutoTokenizer.from_pretrained(directory), WORDS, mode="added_tokens")
    expansion.tokenizer.save_pretrained(directory)  # into two of the three spare rows
    export_gguf(directory, directory / GGUF_FILE, "f32")

    fields = metadata(directory / GGUF_FILE)
    new = slice(expansion.new_start, expansion.new_start + len(WORDS))
    # llama.cpp matches user-defined tokens whole in the raw text, as Hugging Face added tokens are
    assert fields["tokenizer.ggml.tokens"][new] == WORDS
    assert fields["tokenizer.ggml.token_type"][new] == [gguf.TokenType.USER_DEFINED] * len(WORDS)
    types = fields["tokenizer.ggml.token_type"]
    assert types[expansion.tokenizer.convert_tokens_to_ids("<s>")] == gguf.TokenType.CONTROL


def test_llama3_rope_scaling_is_written_as_rope_freqs(tiny_tokenizer_dir, tmp_path):
    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    directory, _ = tiny_llama_dir(tmp_path, tiny_tokenizer_dir(bos=True), False, rope_parameters=scaling,
                                  hidden_size=256, intermediate_size=64)  # head_dim 64: some dims of each kind
    export_gguf(directory, directory / GGUF_FILE, "f32")

    reader = gguf.GGUFReader(directory / GGUF_FILE)
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data.tolist()
    expected = []  # Llama 3.1's rule: long wavelengths slowed down by `factor`, short ones kept, smooth between
    for i in range(0, 64, 2):
        wavelength = 2 * math.pi * 500000.0 ** (i / 64)
        smooth = (64 / wavelength - 1.0) / (4.0 - 1.0)
        expected.append(1.0 if wavelength < 64 / 4 else 8.0 if wavelength > 64 / 1 else 1 / ((1 - smooth) / 8 + smooth))
    assert factors == pytest.approx(expected, rel=1e-5)
    assert 1.0 in factors and 8.0 in factors and any(1 < f < 8 for f in factors)


# --- what cannot be exported -----------------------------------------------------------------


def test_an_unsupported_architecture_is_a_clear_error_before_anything_is_written(tiny_tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=True))
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer), n_positions=32))
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ExportError, match=r"GPT2LMHeadModel.*convert_hf_to_gguf\.py"):
        export_gguf(tmp_path / "gpt2", tmp_path / "out" / GGUF_FILE)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_tokenizer_that_is_not_byte_level_bpe_is_a_clear_error(tiny_model_dir):
    config = LlamaConfig.from_pretrained(tiny_model_dir())
    tokenizer_json = json.loads((tiny_model_dir() / "tokenizer.json").read_text())
    sentencepiece = tokenizer_json | {"model": tokenizer_json["model"] | {"byte_fallback": True}}
    with pytest.raises(ExportError, match="byte-level BPE.*byte fallback"):
        check_exportable(config, sentencepiece)


SMOLLM2_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}


def split_then_bytes(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


@pytest.mark.parametrize("pre_tokenizer,name", [
    (SMOLLM2_PRE, "smollm"),  # SmolLM2's own tokenizer.json
    (split_then_bytes(gguf_export.LLAMA3_SPLIT), "llama-bpe"),
    (split_then_bytes(gguf_export.QWEN2_SPLIT), "qwen2"),
    ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, "gpt-2"),
])
def test_the_pre_tokenizer_name_comes_from_its_regex(tiny_model_dir, pre_tokenizer, name):
    config = LlamaConfig.from_pretrained(tiny_model_dir())
    tokenizer_json = json.loads((tiny_model_dir() / "tokenizer.json").read_text()) | {"pre_tokenizer": pre_tokenizer}
    if name == "llama-bpe":  # Llama 3's tokenizer looks whole words up, as llama.cpp does for llama-bpe
        tokenizer_json["model"] = tokenizer_json["model"] | {"ignore_merges": True}
    assert check_exportable(config, tokenizer_json)[1] == name


def test_an_unknown_pre_tokenizer_is_a_clear_error_unless_named(tiny_model_dir):
    config = LlamaConfig.from_pretrained(tiny_model_dir())
    tokenizer_json = json.loads((tiny_model_dir() / "tokenizer.json").read_text())
    tokenizer_json["pre_tokenizer"] = split_then_bytes(r"\p{L}+|\p{N}+|\s+")
    with pytest.raises(ExportError, match=r"pre-tokenizer .*Split.*gguf_pre=NAME"):
        check_exportable(config, tokenizer_json)
    assert check_exportable(config, tokenizer_json, pre="my-pre")[1] == "my-pre"


def test_the_known_regexes_are_the_ones_transformers_reads_gguf_files_with():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as splits

    assert splits["llama-bpe"] == gguf_export.LLAMA3_SPLIT
    assert splits["qwen2"] == gguf_export.QWEN2_SPLIT
    assert splits["tekken"] == gguf_export.TEKKEN_SPLIT


def test_merges_in_either_json_form_are_written_as_llama_cpp_strings():
    pairs = {"model": {"merges": [["Ġ", "t"], ["Ġt", "he"]]}}
    strings = {"model": {"merges": ["Ġ t", "Ġt he"]}}
    assert gguf_export._merges(pairs) == gguf_export._merges(strings) == ["Ġ t", "Ġt he"]
    with pytest.raises(ExportError, match="space"):
        gguf_export._merges({"model": {"merges": [["a b", "c"]]}})


def test_options_are_checked():
    with pytest.raises(ExportError, match="f16"):
        GgufOptions("q4_0")
    with pytest.raises(ExportError, match="pre-tokenizer"):
        GgufOptions("f16", pre=" ")


# --- the API and the job ---------------------------------------------------------------------


def test_the_api_writes_a_gguf_beside_the_saved_model(tiny_model_dir, tmp_path):
    from tokdist_ray import DistillationConfig, FileDataSource, TokenDistillation

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, sentence in enumerate(SENTENCES):
        (corpus / f"doc{i}.txt").write_text(sentence, encoding="utf-8")
    td = TokenDistillation(str(tiny_model_dir(tied=False)), device="cpu")
    with pytest.raises(ExportError, match="q8"):  # checked before any work
        td.run(WORDS, out_path=str(tmp_path / "x"), save=True, gguf=True, gguf_dtype="q8")
    with pytest.raises(ValueError, match="save=True"):
        td.run(WORDS, gguf=True)
    out = tmp_path / "out"
    td.run(WORDS, out_path=str(out), data=FileDataSource(str(corpus)), snippet_len=16, snippets_per_token=2,
           training=DistillationConfig(epochs=1, batch_size=4, log_every=1000), save=True, gguf=True,
           gguf_dtype="f32")

    exported = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(load_gguf_model(out).get_output_embeddings().weight, exported.get_output_embeddings().weight)
    tokenizer = AutoTokenizer.from_pretrained(out)
    gguf_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=GGUF_FILE)
    for text in SENTENCES:
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def job_settings(*options):
    from tokdist_ray.job.config import config_dict, load_config, parse_overrides

    return load_config(None, parse_overrides(["--tokens.list", " a", "--data.paths", "docs", *options])), config_dict


def test_the_job_option_exports_again_and_leaves_the_runs_keys_as_before_the_option():
    from tokdist_ray.errors import ConfigError
    from tokdist_ray.job import pipeline

    def keys(*options):
        config, plain = job_settings(*options)
        return pipeline.stage_keys(config, plain(config))

    config, plain = job_settings()
    settings = plain(config)
    assert config.output.gguf is False  # off by default
    before = {k: v for k, v in settings["output"].items() if k not in ("gguf", "gguf_dtype", "gguf_pre")}
    old_run = pipeline._key(keys()["snippets"], {k: v for k, v in settings["training"].items()
                                                 if k not in ("log_every", "time_budget_s")},
                            before, {k: v for k, v in settings["distributed"].items() if k not in (
                                "resume", "max_failures", "checkpoint_every", "checkpoint_every_s",
                                "checkpoint_upload", "keep_checkpoints")})
    plain_keys = keys()
    assert plain_keys["run"] == old_run  # checkpoint runs from before the option are resumed, not redone
    with_gguf = keys("--output.gguf", "true")
    assert [k for k in plain_keys if plain_keys[k] != with_gguf[k]] == ["export"]
    assert keys("--output.gguf", "true", "--output.gguf_dtype", "bf16")["export"] not in (
        plain_keys["export"], with_gguf["export"])
    assert keys("--output.gguf_dtype", "bf16") == plain_keys  # no GGUF asked for: nothing to redo
    with pytest.raises(ConfigError, match="gguf_dtype"):
        job_settings("--output.gguf_dtype", "q4")


def test_the_job_refuses_an_unexportable_model_before_it_starts(tiny_tokenizer_dir, tmp_path):
    from tokdist_ray.job.checks import check_gguf_export

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=True))
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer))).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config, _ = job_settings("--model", str(tmp_path), "--output.gguf", "true")
    with pytest.raises(ExportError, match="GPT2LMHeadModel"):
        check_gguf_export(config)
    check_gguf_export(job_settings("--model", str(tmp_path))[0])  # not asked for: not checked
