"""End to end on the real SmolLM2-135M and real English text (the Python docs)."""

import pytest
import torch
from transformers import AutoTokenizer

from tokdist_ray import DistillationConfig, FileDataSource, OutputFitConfig, TokenDistillation
from tokdist_ray.data.mining.local_mining import mine_snippets
from tokdist_ray.eval.drift import baseline_rows, drift
from tokdist_ray.training.batching import align_snippets
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.selection import frequent_fragmented_words


def _read(paths):
    return [p.read_text(encoding="utf-8") for p in paths]


@pytest.fixture(scope="module")
def heldout_words(smollm2_dir, docs_corpus_split):
    """Words SmolLM2 over-fragments, frequent in training text and present in held-out text."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    heldout = "\n".join(_read(docs_corpus_split.heldout))
    ranked = frequent_fragmented_words(tok, _read(docs_corpus_split.train), 60, min_pieces=3, min_count=30)
    words = [w for w, _ in ranked if w.startswith(" ") and heldout.count(w) >= 4][:6]
    assert len(words) == 6, ranked
    return words


def test_distilled_rows_beat_the_subtoken_mean_on_heldout_text(smollm2_dir, docs_corpus_split, heldout_words):
    td = TokenDistillation(str(smollm2_dir), device="cpu")
    original = td.model.get_input_embeddings().weight.detach().clone()
    model, tokenizer = td.run(
        heldout_words,
        data=FileDataSource(str(docs_corpus_split.train_dir)),
        snippet_len=32,
        snippets_per_token=24,
        training=DistillationConfig(epochs=1, batch_size=8, learning_rate=1e-3, log_every=1000),
        output_fit=OutputFitConfig(enabled=False),  # drift is the input rows' doing; the fit would read 400 kB
    )
    new_start = len(td.tokenizer)
    assert torch.equal(model.get_input_embeddings().weight[:new_start], original[:new_start])
    for i, word in enumerate(heldout_words):
        assert tokenizer(word, add_special_tokens=False)["input_ids"] == [new_start + i]

    expansion = expand_with_merges(td.tokenizer, heldout_words)  # the same tokenizer the run built
    assert expansion.tokenizer.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    tokens = expansion.tokens
    rows, _ = mine_snippets(_read(docs_corpus_split.heldout), expansion, 32, 6)
    examples = align_snippets(PieceAligner.for_tokens(tokens, new_start), [r["input_ids"] for r in rows])
    methods = {"token_distillation": model.get_input_embeddings().weight[new_start:].detach(),
               **baseline_rows(model, tokens, new_start)}
    results = drift(model, new_start, methods, examples, [r["token"] for r in rows], batch_size=8)
    mse = {name: r["overall"]["hidden_mse"] for name, r in results.items()}
    kl = {name: r["overall"]["kl"] for name, r in results.items()}
    print("held-out last-layer MSE", mse, "KL", kl)
    assert mse["token_distillation"] < mse["fvt"]
    assert kl["token_distillation"] < kl["fvt"]
    assert mse["fvt"] < mse["mean_embedding"]
