"""Held-out drift metrics on cases with known answers."""

import torch
from transformers import AutoTokenizer

from tokdist_ray.eval.compression import compression
from tokdist_ray.eval.drift import baseline_rows, drift, markdown_table, relative_to
from tokdist_ray.vocab.models import load_model
from tokdist_ray.vocab.tokens import select_new_tokens


def _examples(tok, new_id):
    """Snippets where the 'new' token stands in for one original token x (identity alignment)."""
    texts = ["the river runs through the old town", "the market square fills with people"]
    examples, owners = [], []
    for text in texts:
        ids = tok(text)["input_ids"]
        student = list(ids)
        student[2] = new_id
        examples.append({"teacher_ids": ids, "student_ids": student, "teacher_index": list(range(len(ids)))})
        owners.append(text.split()[1])
    return examples, owners, [e["teacher_ids"][2] for e in examples]


def test_a_row_that_reproduces_the_original_scores_zero_and_a_broken_row_scores_high(tiny_model_dir):
    model_dir = tiny_model_dir(tied=True)
    model, tok = load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    new_start = len(tok)
    examples, owners, replaced = _examples(tok, new_start)
    table = model.get_input_embeddings().weight.detach()
    exact = table[replaced[0]][None].clone()
    assert replaced[0] == replaced[1]  # both snippets replace the same original token
    broken = exact + 5.0
    results = drift(model, new_start, {"exact": exact, "broken": broken}, examples, owners, target_layer=1)
    for metric in ("hidden_mse", "target_mse", "kl"):
        assert results["exact"]["overall"][metric] < 1e-10
        assert results["broken"]["overall"][metric] > 1e-3
    assert set(results["broken"]["per_token"]) == {"river", "market"}
    assert results["exact"]["overall"]["positions"] == sum(len(e["student_ids"]) - 2 for e in examples)
    table_md = markdown_table({"fvt": results["broken"], "exact": results["exact"]})
    assert "| exact |" in table_md and relative_to({"fvt": results["broken"], "x": results["exact"]})["x"]["kl"] < 1e-6


def test_baselines_are_built_from_the_original_rows(tiny_model_dir):
    model_dir = tiny_model_dir(tied=False)
    model, tok = load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    tokens = select_new_tokens(tok, [" Krankenwagen"]).tokens
    rows = baseline_rows(model, tokens, len(tok))
    table = model.get_input_embeddings().weight
    torch.testing.assert_close(rows["fvt"][0], table[list(tokens[0].phrase_ids)].mean(0))
    torch.testing.assert_close(rows["mean_embedding"][0], table[: len(tok)].mean(0))
    assert not torch.allclose(rows["adapti-vocab"][0], rows["fvt"][0])
    assert list(baseline_rows(model, tokens, len(tok), names=["fvt"])) == ["fvt"]


def test_compression_counts_tokens_per_byte(tiny_model_dir):
    from tokdist_ray.vocab.merges import add_tokens

    tok = AutoTokenizer.from_pretrained(tiny_model_dir(tied=True))
    tokens = select_new_tokens(tok, [" Krankenwagen"]).tokens
    expanded = add_tokens(tok, tokens)
    result = compression(tok, expanded, ["a Krankenwagen and a Krankenwagen"])
    assert result["tokens_before"] - result["tokens_after"] == 2 * (len(tokens[0].phrase_ids) - 1)
    assert result["tokens_per_byte_after"] < result["tokens_per_byte_before"]
