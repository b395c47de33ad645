"""What a new token costs and saves (training/token_value.py), and taking the ones that do
not pay out of the tokenizer (vocab/pruning.py, stages.prune_tokens)."""

import math
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from tests.helpers import SENTENCES, WORDS
from tokdist_ray.config import OutputFitConfig
from tokdist_ray.export.hf import expand_model
from tokdist_ray.stages import prune_tokens
from tokdist_ray.training.token_value import TokenValue, measure_token_value
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.merges import ADDED_TOKENS, expand_with_merges
from tokdist_ray.vocab.models import load_model
from tokdist_ray.vocab.pruning import cannot_prune, corpus_occurrences, prune
from tokdist_ray.vocab.special import start_token


@pytest.fixture
def tiny(tiny_model_dir):
    model = load_model(tiny_model_dir(tied=False))
    expansion = expand_with_merges(AutoTokenizer.from_pretrained(tiny_model_dir(tied=False)), WORDS)
    g = torch.Generator().manual_seed(0)
    n, d = len(expansion.tokens), model.config.hidden_size
    rows = {"input": torch.randn(n, d, generator=g) * 0.5, "output": torch.randn(n, d, generator=g) * 0.5}
    return model, expansion, rows


def _nll(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return -logits[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def test_costs_are_the_expanded_models_bits_against_the_originals_on_the_same_text(tiny):
    """Spans and mass, from the new rows held apart, against the expanded model built as
    the export builds it and the original model reading the pieces."""
    model, expansion, rows = tiny
    tokenizer, start, new_start = expansion.tokenizer, start_token(expansion.tokenizer), expansion.new_start
    seqs = [[start, *tokenizer(s, add_special_tokens=False)["input_ids"]] for s in SENTENCES]
    pieces = [t.phrase_ids for t in expansion.tokens]
    held = [True, False, True, True]  # one chunk the fit read, three held back
    value = measure_token_value(model, rows, new_start, pieces, seqs, held, text_bytes=1000.0, held_text_bytes=100.0,
                                mixed_precision=False)

    expanded = expand_model(load_model(model.name_or_path), new_start, rows["input"], rows["output"]).eval()
    aligner = PieceAligner(pieces, new_start)
    n = len(pieces)
    span, mass, seen, occurrences = torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.zeros(n)
    with torch.no_grad():
        for seq, h in zip(seqs, held):
            new = [t - new_start for t in seq if t >= new_start]
            occurrences += torch.bincount(torch.tensor(new, dtype=torch.long), minlength=n)
            if not h:
                continue
            logits = expanded(torch.tensor([seq])).logits[0].double()
            nll = _nll(logits, seq)
            taken = torch.logsumexp(logits[:-1], -1) - torch.logsumexp(logits[:-1, :new_start], -1)
            teacher = aligner.align(seq)
            original = _nll(model(torch.tensor([teacher.teacher_ids])).logits[0].double(), teacher.teacher_ids)
            ends = teacher.teacher_positions
            for j in range(1, len(seq)):
                extra = nll[j - 1] - original[ends[j - 1] : ends[j]].sum()
                if seq[j] >= new_start:
                    span[seq[j] - new_start] += extra
                    seen[seq[j] - new_start] += 1
                    continue
                if seq[j - 1] >= new_start:
                    span[seq[j - 1] - new_start] += extra - taken[j - 1]
                mass += taken[j - 1] * logits[j - 1, new_start:].softmax(-1)
    assert seen.sum() > 0 and (occurrences > 0).any()
    torch.testing.assert_close(value.occurrences.float(), occurrences)
    torch.testing.assert_close(value.held_occurrences.float(), seen)
    torch.testing.assert_close(value.span_nats.float(), span, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(value.mass_nats.float(), mass, atol=1e-5, rtol=1e-4)


def _value(occurrences, held, span, mass):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return TokenValue(t(occurrences), 1000.0, t(held), t(span), t(mass), 100.0)


def test_a_token_pays_when_its_bits_per_saved_id_are_under_the_threshold():
    pieces = [(1, 2), (3, 4, 5), (6, 7)]
    #            occurs, predicted better   never occurs, takes mass   costs 2 nats per occurrence, saves 2 ids each
    value = _value([10, 0, 10], [4, 0, 4], [-2.0, 0.0, 8.0], [0.01, 0.05, 0.0])
    cost = value.bits_per_byte()
    mean = (-2.0 + 8.0) / 8
    assert cost[2] == pytest.approx(10 / 1000 * (8.0 + mean) / 5 / math.log(2))  # span shrunk by one occurrence at the mean
    assert cost[0] < 0 < cost[1]
    assert value.not_paying(pieces, 0.0) == [1, 2]
    bits_per_id = float(cost[2] / value.ids_saved_per_byte(pieces)[2])
    assert value.not_paying(pieces, bits_per_id * 1.01) == [1]  # the one that saves nothing goes whatever it costs
    assert value.not_paying(pieces, bits_per_id * 0.99) == [1, 2]
    assert TokenValue.from_record(value.as_record()).not_paying(pieces, 0.0) == [1, 2]


def _index(expansion, text):
    return [t.text for t in expansion.tokens].index(text)


def test_taking_a_token_out_keeps_the_tokens_it_builds_and_the_rest_as_they_were(tiny):
    _, expansion, _ = tiny
    intermediates = [expansion.tokens.index(t) for t in expansion.intermediates]
    assert intermediates, "WORDS need intermediates on the tiny tokenizer"
    krank, schmetterling = _index(expansion, " Krankenwagen"), _index(expansion, " Schmetterling")
    # an intermediate another kept token is built from stays
    assert prune(expansion, intermediates)[1] == list(range(len(expansion.tokens)))
    # with its intermediates asked to go too, those only it is built from go with it
    pruned, keep = prune(expansion, [krank, *intermediates])
    assert krank not in keep and schmetterling in keep
    assert {expansion.tokens[i].text for i in keep} - {" Schmetterling"} == \
        {t.text for t in expansion.intermediates if t.text in " Schmetterling"}
    assert [t.text for t in pruned.tokens] == [expansion.tokens[i].text for i in keep]
    assert pruned.n_requested == expansion.n_requested - 1
    assert len(pruned.tokenizer) == len(expansion.tokenizer) - (len(expansion.tokens) - len(keep))
    text = "the Krankenwagen and the Schmetterling"
    ids = pruned.tokenizer(text)["input_ids"]
    assert pruned.tokenizer.decode(ids) == expansion.tokenizer.decode(expansion.tokenizer(text)["input_ids"])
    assert pruned.new_start + _index(pruned, " Schmetterling") in ids  # still one id
    original = AutoTokenizer.from_pretrained(expansion.tokenizer.name_or_path)
    assert pruned.tokenizer(" the Krankenwagen")["input_ids"] == original(" the Krankenwagen")["input_ids"]
    only_old = "the river and the garden"
    assert pruned.tokenizer(only_old)["input_ids"] == original(only_old)["input_ids"]
    both_gone, none_kept = prune(expansion, range(len(expansion.tokens)))
    assert both_gone.tokens == [] == none_kept and both_gone.tokenizer(text)["input_ids"] == original(text)["input_ids"]


def test_a_token_whose_text_would_keep_a_new_token_stays(tiny):
    """Taken out, ` Krankenwagen` would leave ` Krankenw` + `agen` while ` Krankenw` stays
    (here as if another kept token were built on it): its row was fitted to be unlikely
    exactly there. So it stays, and with ` Krankenw` gone too, both go."""
    _, expansion, _ = tiny
    krank = _index(expansion, " Krankenwagen")
    steps = [i for i, t in enumerate(expansion.tokens) if " Krankenwagen".startswith(t.text) and i != krank]
    assert steps, "the tiny tokenizer builds ' Krankenwagen' through intermediates"
    shorter = [t for t in steps if expansion.tokens[t].text != " Krankenw"]
    assert prune(expansion, [krank, *shorter])[1] == list(range(len(expansion.tokens)))  # " Krankenw" stays, so it does
    _, keep = prune(expansion, [krank, *steps])
    assert krank not in keep and not set(steps) & set(keep)


def test_corpus_counts_say_how_often_a_token_the_fit_text_lacks_occurs(tiny):
    # at tens of thousands of tokens most never occur in the fit text: by its counts they would save nothing
    _, expansion, rows = tiny
    n = len(expansion.tokens)
    lacking = [i for i, t in enumerate(expansion.tokens) if t.text in " Schmetterling" and t.text not in " Krankenwagen"]
    summary = {"token_value": _value([0 if i in lacking else 5 for i in range(n)], [10] * n, [-10.0] * n,
                                     [0.01] * n).as_record()}
    settings = OutputFitConfig(max_bits_per_saved_id=0.0)
    by_fit_text = prune_tokens(expansion, rows, summary, settings)
    assert by_fit_text.kept == [i for i in range(n) if i not in lacking]
    assert by_fit_text.report["occurrences_from"] == "the fit text"
    # counts as continued BPE learns them: each merge's firings, which later merges built on it take from:
    # 100 occurrences of each token are left
    text_of = {expansion.tokenizer.convert_ids_to_tokens(expansion.new_start + i): t.text
               for i, t in enumerate(expansion.tokens)}
    counts = Counter()
    for left, right in reversed(expansion.merges):
        built = text_of[left + right]
        counts[built] += 100
        for side in (left, right):
            if side in text_of:
                counts[text_of[side]] += counts[built]
    assert corpus_occurrences(expansion, counts) == [100] * n
    by_corpus = prune_tokens(expansion, rows, summary, settings, counts)
    assert by_corpus.report["occurrences_from"] == "the corpus counts" and by_corpus.kept == list(range(n))


def test_added_tokens_are_not_pruned(tiny):
    _, expansion, _ = tiny
    added = expand_with_merges(AutoTokenizer.from_pretrained(expansion.tokenizer.name_or_path), WORDS, mode=ADDED_TOKENS)
    assert "added tokens" in cannot_prune(added)
    with pytest.raises(ValueError, match="cannot take new tokens out"):
        prune(added, [0])


def test_prune_tokens_takes_out_the_rows_and_reports_what_went(tiny):
    _, expansion, rows = tiny
    n = len(expansion.tokens)
    # " Krankenwagen" and the intermediates only it is built from cost; the rest is predicted better than its pieces
    chain = [i for i, t in enumerate(expansion.tokens) if t.text in " Krankenwagen" and t.text not in " Schmetterling"]
    costly = [-10.0] * n  # over 10 held-back occurrences each
    for i in chain:
        costly[i] = 50.0
    summary = {"token_value": _value([5] * n, [10] * n, costly, [0.0] * n).as_record()}
    off = prune_tokens(expansion, rows, summary, OutputFitConfig(prune=False))
    assert off.expansion is expansion and off.report["pruned"] is False and off.report["not_paying"] == len(chain)
    pruning = prune_tokens(expansion, rows, summary, OutputFitConfig(max_bits_per_saved_id=0.0))
    assert pruning.report["pruned"]
    assert [t["token"] for t in pruning.report["tokens_taken_out"]] == [expansion.tokens[i].text for i in chain]
    keep = [i for i in range(n) if i not in chain]
    assert pruning.kept == keep
    assert all(torch.equal(pruning.rows[k], rows[k][keep]) for k in rows)
    record = pruning.training_record({"positions_per_token": list(range(n)), "training": {}})
    assert record["positions_per_token"] == keep
    assert prune_tokens(expansion, rows, {}, OutputFitConfig(prune=True)).expansion is expansion  # no fit, nothing to go by
    nothing_pays = {"token_value": _value([0] * n, [0] * n, [0.0] * n, [1.0] * n).as_record()}
    kept_all = prune_tokens(expansion, rows, nothing_pays, OutputFitConfig())  # the run's rows stay usable
    assert kept_all.expansion is expansion and "max_bits_per_saved_id" in kept_all.report["skipped"]
