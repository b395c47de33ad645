"""Bits per byte and compression on held-out text, against direct computations."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from tokdist_ray.errors import ConfigError
from tokdist_ray.eval.bits_per_byte import (
    ChunkScore,
    bits_per_byte,
    compare_to_original,
    heldout_chunks,
    markdown_table,
    span_totals,
    summarise,
    token_log_probs,
)
from tokdist_ray.export.hf import expand_model
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import load_model

# No " Krankenwagen" or " Schmetterling" here; non-ASCII so that bytes and characters differ.
PLAIN_DOCS = [
    "The weather today is mild, with a light wind from the west.\nTomorrow it will rain in the north.\n",
    "Children walk to school along the river while their parents hurry to the station. "
    "The café by the bridge serves bread, cheese and apples — déjà vu every morning.",
    "A short one.",
    "Trains leave the central station every ten minutes during the day and every hour at night.\n\n"
    "The journey to the coast takes about two hours, and the view from the window is beautiful.",
]
WORDS = [" Krankenwagen", " Schmetterling"]


def _direct_bits(model, ids: list[int]) -> float:
    """-log2 p(ids[1:] | ids[0]) with one unpadded sequence."""
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    return -logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item() / math.log(2)


def _expanded(model_dir, words=WORDS):
    """(original tokenizer, expansion, expanded model) with subtoken-mean rows (zero output rows if untied)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    expansion = expand_with_merges(tok, words)
    model = load_model(model_dir)
    table = model.get_input_embeddings().weight
    rows = torch.stack([table[list(t.phrase_ids)].mean(0) for t in expansion.tokens])
    return tok, expansion, expand_model(model, expansion.new_start, rows)


@pytest.mark.parametrize("tied,bos", [(False, True), (True, False)])
def test_bits_per_byte_equals_an_unbatched_direct_computation(tiny_model_dir, tied, bos):
    model_dir = tiny_model_dir(tied=tied, bos=bos)
    model, tok = load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    chunks = heldout_chunks(PLAIN_DOCS, chunk_bytes=70)
    assert len({len(tok.encode(c, add_special_tokens=False)) for c in chunks}) > 3  # padding is exercised
    start = tok.convert_tokens_to_ids("<s>" if bos else "<|endoftext|>")  # BOS, or EOS without one
    total_bits = total_tokens = 0
    for chunk in chunks:
        ids = tok.encode(chunk, add_special_tokens=False)
        total_bits += _direct_bits(model, [start, *ids])
        total_tokens += len(ids)
    n_bytes = sum(len(d.encode("utf-8")) for d in PLAIN_DOCS)

    result = bits_per_byte(model, tok, chunks, batch_size=3)
    assert result["bytes"] == n_bytes and result["tokens"] == total_tokens
    assert result["bits_per_byte"] == pytest.approx(total_bits / n_bytes, rel=1e-5)
    assert result["tokens_per_byte"] == total_tokens / n_bytes
    assert result["tokens_per_word"] == total_tokens / sum(len(d.split()) for d in PLAIN_DOCS)


def test_a_chunk_longer_than_the_model_context_is_a_user_error(tiny_model_dir):
    model_dir = tiny_model_dir()
    model, tok = load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    with pytest.raises(ConfigError, match="chunk_bytes"):
        token_log_probs(model, tok, ["x " * 400])  # max_position_embeddings is 256


def test_new_tokens_absent_from_the_text_change_nothing_but_the_mass_they_take(tiny_model_dir):
    model_dir = tiny_model_dir(tied=False)
    chunks = heldout_chunks(PLAIN_DOCS, chunk_bytes=70)
    tok, expansion, expanded = _expanded(model_dir)
    new_start = expansion.new_start
    for chunk in chunks:  # the precondition: the text never uses a new id
        assert expansion.tokenizer(chunk)["input_ids"] == tok(chunk)["input_ids"]
    original = bits_per_byte(load_model(model_dir), tok, chunks)

    # With real rows the new ids take probability mass at every position: the text costs more.
    leaky = bits_per_byte(expanded, expansion.tokenizer, chunks, new_start)
    assert leaky["bits_per_byte"] > original["bits_per_byte"] + 1e-4

    head = expanded.get_output_embeddings()  # a bias of -inf on the new ids: no mass on them
    masked = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    masked.weight = head.weight
    masked.bias = torch.nn.Parameter(torch.zeros(head.out_features).index_fill(0, torch.arange(new_start, head.out_features), float("-inf")))
    expanded.set_output_embeddings(masked)
    exact = bits_per_byte(expanded, expansion.tokenizer, chunks, new_start)
    assert exact["bits_per_byte"] == pytest.approx(original["bits_per_byte"], abs=1e-6)
    assert exact["tokens_per_byte"] == original["tokens_per_byte"]
    assert exact["new_tokens"] == 0 and exact["bits_per_byte_new"] == 0 and exact["per_new_token"] == {}


def test_heldout_chunks_are_byte_bounded_pieces_of_the_documents():
    long_line = " ".join(f"word{i}" for i in range(200))
    unbroken = "é" * 90 + "🤗" * 30 + "x" * 7  # no whitespace: cut between characters
    docs = [PLAIN_DOCS[3], long_line, unbroken, "\n".join(["a line of thirty bytes, more ."] * 20)]
    for limit in (4, 37, 100):
        for doc in docs:
            chunks = heldout_chunks([doc], chunk_bytes=limit)
            assert "".join(chunks) == doc  # no tokenizer involved: nothing added, nothing lost
            assert all(0 < len(c.encode("utf-8")) <= limit for c in chunks)
            assert chunks == heldout_chunks([doc], chunk_bytes=limit)
    lines = heldout_chunks([docs[3]], chunk_bytes=100)
    assert all(c.endswith("\n") for c in lines[:-1]) and len(lines) > 3  # cut at line breaks
    words = heldout_chunks([long_line], chunk_bytes=100)
    assert all(c.startswith(" word") for c in words[1:])  # cut before a space, never inside a word
    assert heldout_chunks(docs, chunk_bytes=50) == [c for d in docs for c in heldout_chunks([d], chunk_bytes=50)]
    with pytest.raises(ConfigError):
        heldout_chunks(docs, chunk_bytes=3)


def test_max_bytes_keeps_the_longest_prefix_that_fits_and_reads_no_further():
    docs = PLAIN_DOCS[:3]
    full = heldout_chunks(docs, chunk_bytes=40)
    sizes = [len(c.encode("utf-8")) for c in full]
    for budget in (0, 39, 100, 157, sum(sizes) - 1):
        cut = heldout_chunks(docs, chunk_bytes=40, max_bytes=budget)
        assert cut == full[: len(cut)] and sum(sizes[: len(cut)]) <= budget < sum(sizes[: len(cut) + 1])
    first_doc = len(docs[0].encode("utf-8"))

    def documents():
        yield docs[0]
        yield docs[1]
        raise AssertionError("read a document after the budget was spent")

    assert "".join(heldout_chunks(documents(), chunk_bytes=40, max_bytes=first_doc)) == docs[0]


def test_new_bits_split_and_per_token_comparison_match_a_hand_computation(tiny_model_dir):
    model_dir = tiny_model_dir(tied=True)
    docs = ["The Krankenwagen drove past the river.\nA Schmetterling sat on the bench while the Krankenwagen waited."]
    chunks = heldout_chunks(docs, chunk_bytes=60)
    assert len(chunks) > 1
    tok, expansion, expanded = _expanded(model_dir)
    new_start = expansion.new_start
    original = token_log_probs(load_model(model_dir), tok, chunks)
    scores = token_log_probs(expanded, expansion.tokenizer, chunks, batch_size=1)

    summary = summarise(scores, new_start)
    split = summary["bits_per_byte_new"] + summary["bits_per_byte_other"]
    assert split == pytest.approx(summary["bits_per_byte"], rel=1e-12)
    assert summary["new_tokens"] == sum(i >= new_start for s in scores for i in s.ids) >= 3
    assert summary["bits_per_byte_new"] * summary["bytes"] == pytest.approx(
        sum(v["occurrences"] * v["mean_bits"] for v in summary["per_new_token"].values()), rel=1e-12)

    word = next(t for t in expansion.tokens if t.text == " Krankenwagen")
    word_id = new_start + expansion.tokens.index(word)
    pieces = list(word.phrase_ids)
    expanded_bits, original_bits = [], []
    for o, x in zip(original, scores):
        expanded_bits += [b for i, b in zip(x.ids, x.bits) if i == word_id]
        starts = [p for p in range(len(o.ids)) if o.ids[p : p + len(pieces)] == pieces]
        original_bits += [sum(o.bits[p : p + len(pieces)]) for p in starts]
    assert len(expanded_bits) == len(original_bits) == 2
    row = next(r for r in compare_to_original(original, scores, new_start) if r["token_id"] == word_id)
    assert row["token"] == " Krankenwagen" and row["occurrences"] == 2
    assert row["mean_bits_original"] == pytest.approx(sum(original_bits) / 2, rel=1e-9)
    assert row["mean_bits_expanded"] == pytest.approx(sum(expanded_bits) / 2, rel=1e-9)
    assert row["total_extra_bits"] == pytest.approx(2 * row["difference"])


def test_the_comparison_widens_spans_whose_boundaries_differ_and_ranks_by_extra_bits():
    text = "abcdefgh"
    original = [ChunkScore(text, [1, 2, 3, 4], [(0, 2), (2, 4), (4, 6), (6, 8)], [1.0, 2.0, 3.0, 4.0])]
    # id 10 ("abc") ends inside "cd"; the new "cd.." tokens pull in "def" too: both sides widen to "abcdef".
    # id 11 ("gh") coincides with one original token.
    expanded = [ChunkScore(text, [10, 5, 11], [(0, 3), (3, 6), (6, 8)], [5.0, 0.5, 4.5])]
    rows = compare_to_original(original, expanded, new_start=10)
    assert [r["token_id"] for r in rows] == [11, 10]
    expected = {"token": "abc", "mean_bits_expanded": 5.5, "mean_bits_original": 6.0, "difference": -0.5}
    assert rows[1] | expected == rows[1]
    assert rows[0]["mean_bits_original"] == 4.0 and rows[0]["total_extra_bits"] == 0.5
    assert compare_to_original(original, expanded, new_start=10, top_k=1) == rows[:1]
    with pytest.raises(ValueError):
        compare_to_original(original, [ChunkScore("other", [], [], [])], new_start=10)


def test_markdown_table_puts_the_original_first_with_changes_against_it():
    chunk = ChunkScore("ab cd", [1, 7, 8], [(0, 2), (2, 4), (4, 5)], [2.0, 1.0, 1.0])
    base = summarise([ChunkScore("ab cd", [1, 2, 3], [(0, 2), (2, 4), (4, 5)], [2.0, 2.0, 1.0])])
    table = markdown_table({"td": summarise([chunk], new_start=7), "original": base})
    rows = table.splitlines()
    assert rows[2].startswith("| original | 0.6000 | 1.500 | – | 1.0000 | +0.0000 | +0.00% | – | – | – |")
    assert rows[3] == "| td | 0.6000 | 1.500 | 66.7% | 0.8000 | -0.2000 | -20.00% | 0.4000 | 0.4000 | – |"
    with_spans = summarise([chunk], new_start=7) | {"new_token_spans": {"extra_share": -1 / 3}}
    assert markdown_table({"td": with_spans, "original": base}).splitlines()[3].endswith("| 0.4000 | 0.4000 | -33.3% |")


def test_span_totals_weigh_each_token_by_its_occurrences():
    original = [ChunkScore("ab cd ab", [1, 2, 3, 1, 2], [(0, 1), (1, 2), (2, 5), (5, 7), (7, 8)],
                           [1.0, 2.0, 1.0, 1.0, 1.0])]
    expanded = [ChunkScore("ab cd ab", [9, 3, 9], [(0, 2), (2, 5), (5, 8)], [4.0, 1.0, 1.0])]
    rows = compare_to_original(original, expanded, new_start=9, top_k=None)
    totals = span_totals(rows)
    # " ab" twice: 4 + 1 bits expanded against 1 + 2 and 1 + 1 bits original
    assert totals == {"occurrences": 2, "bits_expanded": 5.0, "bits_original": 5.0, "extra_share": 0.0}
    assert span_totals(compare_to_original(original, [ChunkScore("ab cd ab", [9, 3, 9], [(0, 2), (2, 5), (5, 8)],
                                                                 [6.0, 1.0, 1.5])], 9, None))["extra_share"] == 0.5


def test_methods_and_another_tools_model_dir_are_scored_on_the_same_chunks(tiny_model_dir, tmp_path):
    """score_methods: the original once, each method's rows written into the model itself
    (no copy), and a saved model directory (as another tool would hand it over) on its
    own tokenizer."""
    from tokdist_ray.eval.bits_per_byte import score_methods
    from tokdist_ray.export.hf import save_expanded

    model_dir = tiny_model_dir(tied=True)
    model, tokenizer = load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    expansion = expand_with_merges(tokenizer, WORDS)
    n_new = len(expansion.tokens)
    rows = {"a": torch.randn(n_new, model.config.hidden_size), "b": torch.zeros(n_new, model.config.hidden_size)}
    chunks = heldout_chunks(PLAIN_DOCS + ["The Krankenwagen passed the Schmetterling twice."], chunk_bytes=120)
    other = expand_model(load_model(model_dir), expansion.new_start, rows["a"])
    save_expanded(other, expansion.tokenizer, tmp_path / "other")

    def load_other():
        return load_model(tmp_path / "other"), AutoTokenizer.from_pretrained(tmp_path / "other")

    scored = score_methods(model, tokenizer, expansion.tokenizer, expansion.new_start,
                           {name: (r, None) for name, r in rows.items()}, chunks, other_models={"other": load_other})
    methods = scored["methods"]
    assert list(methods) == ["original", "a", "b", "other"]
    fresh = load_model(model_dir)
    assert methods["original"]["bits_per_byte"] == pytest.approx(bits_per_byte(fresh, tokenizer, chunks)["bits_per_byte"])
    assert methods["other"]["bits_per_byte"] == pytest.approx(methods["a"]["bits_per_byte"], rel=1e-5)
    assert methods["a"]["bits_per_byte"] != pytest.approx(methods["b"]["bits_per_byte"])
    assert methods["a"]["new_tokens"] > 0 and scored["costliest_new_tokens"]["a"]
    old_rows = fresh.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight[: len(old_rows)], old_rows), "old rows must stay bit-identical"


def test_a_tied_model_untied_by_one_method_scores_the_next_as_tied(tiny_model_dir):
    """One model serves every method: once a method's own output rows untie it, a later
    method without them must score as it would on a fresh tied model."""
    from tokdist_ray.eval.bits_per_byte import score_methods

    model_dir = tiny_model_dir(tied=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expansion = expand_with_merges(tokenizer, WORDS)
    d, n_new = load_model(model_dir).config.hidden_size, len(expansion.tokens)
    own, plain = (torch.randn(n_new, d), torch.randn(n_new, d)), (torch.randn(n_new, d), None)
    chunks = heldout_chunks(PLAIN_DOCS + ["The Krankenwagen passed the Schmetterling twice."], chunk_bytes=120)

    def score(methods):
        return score_methods(load_model(model_dir), tokenizer, expansion.tokenizer, expansion.new_start, methods,
                             chunks)["methods"]

    both = score({"own_outputs": own, "tied": plain})
    assert both["tied"]["bits_per_byte"] == pytest.approx(score({"tied": plain})["tied"]["bits_per_byte"], rel=1e-6)
    assert both["own_outputs"]["bits_per_byte"] != pytest.approx(both["tied"]["bits_per_byte"])


def test_log_softmax_over_vocabulary_slices_equals_the_whole(tiny_model_dir, monkeypatch):
    from tokdist_ray.eval import bits_per_byte as bpb

    model_dir = tiny_model_dir(tied=False)
    model, tokenizer = load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    chunks = heldout_chunks(PLAIN_DOCS, chunk_bytes=70)
    monkeypatch.setattr(bpb, "VOCAB_SLICE", 97)  # several slices, the last one short
    scores = bpb.token_log_probs(model, tokenizer, chunks)
    for score in scores[:3]:
        ids = torch.tensor([[tokenizer.bos_token_id, *score.ids]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        whole = -logp.gather(-1, ids[0, 1:, None]).squeeze(-1) / math.log(2)
        torch.testing.assert_close(torch.tensor(score.bits), whole, rtol=1e-5, atol=1e-5)
