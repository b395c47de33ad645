"""The reference-compatible API end to end on tiny models: export, old rows, bad input."""

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import SENTENCES, WORDS
from tokdist_ray import (
    DistillationConfig,
    FileDataSource,
    GeneratedDataSource,
    HFDataSource,
    OutputEmbeddingInit,
    TokenDistillation,
)
from tokdist_ray.config import EvalConfig, OutputFitConfig
from tokdist_ray.errors import ConfigError, ModelNotFoundError, NoNewTokensError

FAST = DistillationConfig(epochs=1, batch_size=4, log_every=1000)


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i, s in enumerate(SENTENCES * 3):
        (d / f"doc{i}.txt").write_text(f"Line {i}. {s} More text follows here.", encoding="utf-8")
    return d


@pytest.mark.parametrize("tied,bos", [(True, True), (False, True), (False, False)])
def test_exported_model_loads_encodes_new_tokens_and_keeps_old_rows(tiny_model_dir, corpus, tmp_path, tied, bos):
    model_dir = tiny_model_dir(tied=tied, bos=bos)
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    td = TokenDistillation(str(model_dir), device="cpu")
    out = tmp_path / "out"
    td.run(WORDS, out_path=str(out), data=FileDataSource(str(corpus)), snippet_len=40, snippets_per_token=5,
           training=FAST, save=True)

    assert sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pkl")) == []
    assert list(out.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    n_old = len(AutoTokenizer.from_pretrained(model_dir))
    for i, word in enumerate(WORDS):
        assert tok(word, add_special_tokens=False)["input_ids"] == [n_old + i]
    assert torch.equal(model.get_input_embeddings().weight[:n_old], original.get_input_embeddings().weight[:n_old])
    assert torch.equal(model.get_output_embeddings().weight[:n_old], original.get_output_embeddings().weight[:n_old])
    for text in SENTENCES + ["The Krankenwagens and Schmetterlinge."]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text

    report = json.loads((out / "report.json").read_text())
    added = report["tokens_added"]  # the words, then the intermediates their merges need
    assert report["tokenizer"]["mode"] == "merges" and report["tokenizer"]["requested_tokens"] == len(WORDS)
    assert [t["token"] for t in added[: len(WORDS)]] == WORDS and [t["id"] for t in added] == list(range(n_old, len(tok)))
    assert [t["token"] for t in added[len(WORDS) :]] == report["tokenizer"]["intermediate_tokens"]
    # each word's quota of 5 is met by the snippets cut around it and by others it occurs in
    assert all(report["snippets"]["snippets_per_token"][w] == 5 for w in WORDS)
    assert all(1 <= t["snippets"] <= 5 for t in added[: len(WORDS)])
    assert all(t["positions_per_epoch"] >= t["snippets"] for t in added)  # each snippet holds its token
    new_rows = model.get_input_embeddings().weight[n_old:]
    assert new_rows.shape[0] == len(added) and torch.isfinite(new_rows).all() and new_rows.abs().sum() > 0
    if not tied:  # trained with CE by default: not zero, not the input rows
        assert model.get_output_embeddings().weight[n_old:].abs().sum() > 0
    assert report["training"]["loss_curve"] and report["timings_s"]["distill"] > 0
    saved = load_file(out / "new_rows.safetensors")  # the rows alone, as the job writes them
    # the output fit on the corpus gives every model output rows of its own: a tied one is exported untied
    assert torch.equal(saved["input"], new_rows) and torch.equal(saved["output"], model.get_output_embeddings().weight[n_old:])
    assert not model.config.tie_word_embeddings and report["output_fit"]["before_new_tokens"] > 0

    if bos and not tied:  # the job's evaluate stage, from the API
        summary = td.evaluate(str(corpus), str(tmp_path / "eval"), EvalConfig(snippets_per_token=2, chunk_bytes=200,
                                                                              bits_per_byte_bytes=2000))
        evaluation = json.loads((tmp_path / "eval" / "eval.json").read_text())
        assert {"token_distillation", "fvt"} <= set(evaluation["methods"]) and summary["plots"]
        assert evaluation["bits_per_byte"]["methods"]["token_distillation"]["bits_per_byte"] > 0


def test_evaluate_needs_a_run_first(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="evaluate needs a run first"):
        TokenDistillation(str(tiny_model_dir()), device="cpu").evaluate(str(tmp_path), str(tmp_path / "eval"))


def test_a_tied_model_untied_on_request_trains_and_exports_its_own_output_rows(tiny_model_dir, corpus, tmp_path):
    model_dir = tiny_model_dir(tied=True)
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    td = TokenDistillation(str(model_dir), device="cpu")
    out = tmp_path / "out"
    training = DistillationConfig(epochs=2, batch_size=4, learning_rate=1e-2, log_every=1000, untie_word_embeddings=True,
                                  loss_methods=["MSE-on-hiddens", "KL-on-new-token-outputs"])
    td.run(WORDS, out_path=str(out), data=FileDataSource(str(corpus)), snippet_len=24, snippets_per_token=4,
           training=training, save=True)

    model = AutoModelForCausalLM.from_pretrained(out)
    n_old = len(AutoTokenizer.from_pretrained(model_dir))
    inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert not model.config.tie_word_embeddings and inputs.data_ptr() != outputs.data_ptr()
    table = original.get_input_embeddings().weight[:n_old]  # the one table of the tied original
    assert torch.equal(inputs[:n_old], table) and torch.equal(outputs[:n_old], table)
    assert inputs.shape == outputs.shape and not torch.allclose(inputs[n_old:], outputs[n_old:])
    assert json.loads((out / "report.json").read_text())["settings"]["training"]["untie_word_embeddings"] is True


def test_added_tokens_mode_is_the_references_tokenizer(tiny_model_dir, corpus):
    td = TokenDistillation(str(tiny_model_dir(tied=True)), device="cpu")
    _, tok = td.run(WORDS, data=FileDataSource(str(corpus)), snippet_len=16, snippets_per_token=2, training=FAST,
                    tokenizer_mode="added_tokens")
    n_old = len(td.tokenizer)
    assert td.last_report["tokenizer"]["mode"] == "added_tokens" and len(tok) == n_old + len(WORDS)
    assert n_old in tok("The Krankenwagens left.", add_special_tokens=False)["input_ids"]  # fires inside longer words


def test_a_tied_model_stays_tied_without_the_output_fit(tiny_model_dir, corpus):
    td = TokenDistillation(str(tiny_model_dir(tied=True)), device="cpu")
    model, _ = td.run(WORDS, data=FileDataSource(str(corpus)), snippet_len=16, snippets_per_token=2, training=FAST,
                      output_fit=OutputFitConfig(enabled=False))
    assert model.config.tie_word_embeddings and "skipped" in td.last_report["output_fit"]
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("policy", [OutputEmbeddingInit.ZERO, OutputEmbeddingInit.SUBTOKEN_MEAN])
def test_output_row_policies_of_untied_models(tiny_model_dir, corpus, policy):
    model_dir = tiny_model_dir(tied=False)
    td = TokenDistillation(str(model_dir), device="cpu")
    head = td.model.get_output_embeddings().weight.detach().clone()
    model, tok = td.run(WORDS, data=FileDataSource(str(corpus)), snippet_len=16, snippets_per_token=3,
                        output_emb_policy=policy, training=FAST, output_fit=OutputFitConfig(enabled=False))
    n_old = len(td.tokenizer)
    new_out = model.get_output_embeddings().weight[n_old:]
    if policy is OutputEmbeddingInit.ZERO:
        assert torch.equal(new_out, torch.zeros_like(new_out))
    else:
        phrase = td.tokenizer(WORDS[0], add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(new_out[0], head[phrase].mean(0))


def test_generated_snippets_drive_a_run(tiny_model_dir):
    td = TokenDistillation(str(tiny_model_dir(tied=True)), device="cpu")
    model, tok = td.run(WORDS[:1], data=GeneratedDataSource(seed=1, min_new_tokens=1), snippet_len=8,
                        snippets_per_token=4, training=FAST)
    assert td.last_report["tokens_added"][0]["snippets"] > 0
    assert td.last_report["snippets"]["source"] == "GeneratedDataSource"


def test_signature_matches_the_reference_api():
    params = inspect.signature(TokenDistillation.run).parameters
    expected = ["self", "new_tokens", "out_path", "data", "snippet_len", "snippets_per_token", "output_emb_policy",
                "training", "pre_init_strategy", "save"]
    assert list(params)[: len(expected)] == expected
    assert params["snippet_len"].default == 50 and params["snippets_per_token"].default == 100
    # chosen by measurement: untied output rows from the first piece, not trained
    assert params["output_emb_policy"].default == OutputEmbeddingInit.FIRST_PIECE
    assert params["pre_init_strategy"].default == "fvt" and params["save"].default is False
    cfg = DistillationConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.learning_rate, cfg.seed, cfg.target_layer,
            cfg.mixed_precision) == (1, 1, 1e-4, 42, -1, True)
    # the one default chosen by measurement: the reference's loss plus the output side
    assert cfg.loss_methods == ("MSE-on-hiddens", "KL-on-new-token-outputs")
    assert DistillationConfig(loss_methods=["MSE-on-hiddens"]).loss_methods == ("MSE-on-hiddens",)
    hf = HFDataSource("x")
    assert (hf.split, hf.tokenization_batch_size, hf.max_docs, hf.trust_remote_code) == ("train", 16_000, 1_000_000, False)
    assert GeneratedDataSource().seed == 42
    assert {e.value for e in OutputEmbeddingInit} >= {"zero", "subtoken_mean", "train_with_ce"}


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does/not/exist"):
        TokenDistillation(str(tmp_path / "does/not/exist"), device="cpu")


def test_bad_token_lists_are_clear_errors(tiny_model_dir, corpus):
    td = TokenDistillation(str(tiny_model_dir(tied=True)), device="cpu")
    with pytest.raises(NoNewTokensError, match="empty"):
        td.run([], data=FileDataSource(str(corpus)))
    with pytest.raises(NoNewTokensError, match="already a single token"):
        td.run([" the", "</s>"], data=FileDataSource(str(corpus)))
    with pytest.raises(ValueError, match="out_path"):
        td.run(WORDS, save=True)


def test_rows_without_text_are_counted_and_tokens_never_found_are_reported(tiny_model_dir, tmp_path):
    rows = [{"text": SENTENCES[0]}, {"text": None}, {"other": 1}, {"text": ""}, {"text": 7}, {"text": SENTENCES[1]}]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    td = TokenDistillation(str(tiny_model_dir(tied=True)), device="cpu")
    td.run(WORDS + [" distillation"], data=FileDataSource(str(data)), snippet_len=12, snippets_per_token=2, training=FAST)
    report = td.last_report
    mined = report["snippets"]["mining"]
    assert mined["bad_rows"] == 4 and mined["documents"] == 2
    assert {"token": " distillation", "reason": "too_few_snippets", "snippets": 0} in report["tokens_not_distilled"]
    with pytest.raises(ValueError, match="none of the .* new tokens has 1 snippet"):
        td.run([" distillation"], data=FileDataSource(str(data)), training=FAST)
