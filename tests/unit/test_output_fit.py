"""The output fit: its loss, what it learns, what it leaves alone, the corpus text it reads."""

import gzip
from dataclasses import replace

import pytest
import torch

from tests.helpers import SENTENCES, WORDS
from tokdist_ray.config import FileDataSource, OutputFitConfig
from tokdist_ray.data.corpus.corpus import text_sample
from tokdist_ray.errors import ConfigError
from tokdist_ray.training.output_fit import (
    POSITIONS_PER_PASS,
    FitPositions,
    RowSample,
    fit_chunk_ids,
    fit_on_text,
    fit_output_rows,
    fit_sequences,
    position_losses,
    reading_passes,
    sample_rows,
)
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import load_model
from tokdist_ray.vocab.special import start_token


def _positions(n=4000, d=8, n_old=20, n_new=2, seed=0):
    """Positions drawn from a known model: targets sampled from softmax([old logits, W* h])."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    old_rows = torch.randn(n_old, d, generator=g)
    true_new = torch.randn(n_new, d, generator=g) * 2
    logits = torch.cat([hidden @ old_rows.T, hidden @ true_new.T], -1)
    targets = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
    at = FitPositions(hidden, torch.logsumexp(hidden @ old_rows.T, -1),
                      torch.where(targets >= n_old, targets - n_old, -1), torch.arange(n) % 10 == 9, torch.ones(n))
    return at, old_rows, true_new, logits, targets


def test_position_losses_are_the_expanded_models_nll_less_a_constant_at_old_targets():
    at, old_rows, _, _, targets = _positions(n=50)
    rows = torch.randn(2, 8)
    full = torch.cat([at.hidden @ old_rows.T, at.hidden @ rows.T], -1).log_softmax(-1)
    nll = -full.gather(1, targets[:, None]).squeeze(1)
    old_target = targets < len(old_rows)
    # before an old token the frozen part, A - old logit, is left out: it does not depend on the rows
    constant = at.old_log_norm - (at.hidden @ old_rows.T).gather(1, targets.clamp(max=19)[:, None]).squeeze(1)
    expected = torch.where(old_target, nll - constant, nll)
    assert torch.allclose(position_losses(rows, at, torch.arange(50)), expected, atol=1e-5)


def test_fit_recovers_the_rows_the_text_was_drawn_from():
    at, _, true_new, _, _ = _positions()
    settings = OutputFitConfig(learning_rate=0.05, max_steps=600, batch_positions=1024)
    start = torch.zeros(2, 8)
    result = fit_output_rows(start, at, settings, seed=0)
    held = at.held_back.nonzero().squeeze(1)
    fitted_loss = position_losses(result.rows, at, held).mean()
    true_loss = position_losses(true_new, at, held).mean()
    assert fitted_loss < position_losses(start, at, held).mean() - 0.05
    assert fitted_loss < true_loss + 0.02  # as good as the true rows on text it did not fit on
    assert result.summary["held_back_loss_best"] < result.summary["held_back_loss_start"]
    again = fit_output_rows(start, at, settings, seed=0)
    assert torch.equal(result.rows, again.rows)  # the same rows from the same seed


def test_a_sampled_normaliser_is_unbiased_and_holds_each_positions_own_token():
    at, _, _, _, _ = _positions(n=64, n_new=40)
    rows, index = torch.randn(40, 8), torch.arange(64)
    exact = torch.logsumexp(at.hidden @ rows.T, -1).exp()
    g, estimates = torch.Generator().manual_seed(0), []
    for _ in range(3000):
        sample = sample_rows(40, at.new_target, 12, g)
        own = at.new_target[at.new_target >= 0]
        assert torch.equal(sample.index[sample.column[own]], own)  # every next token's logit is computed
        assert len(sample.index) <= max(12, len(own.unique()) + 6)
        estimates.append(torch.logsumexp(at.hidden @ rows[sample.index].T + sample.log_weight, -1).exp())
    assert torch.allclose(torch.stack(estimates).mean(0), exact, rtol=0.05)
    assert sample_rows(40, at.new_target, 40, g) is None  # affording every row, a step computes them all
    reversed_rows = torch.arange(40).flip(0)  # a "sample" of every row, in another order: the exact loss
    every = RowSample(reversed_rows, torch.zeros(40), torch.argsort(reversed_rows))
    assert torch.allclose(position_losses(rows, at, index, every), position_losses(rows, at, index), atol=1e-5)


def test_a_step_over_more_new_rows_than_its_budget_still_recovers_them():
    at, _, true_new, _, _ = _positions(n_new=24)
    capped = OutputFitConfig(learning_rate=0.05, max_steps=1500, batch_positions=32, max_step_logits=32 * 8)
    some = sample_rows(24, at.new_target[:32], 8, torch.Generator().manual_seed(0))
    assert len(some.index) < 24 and some.log_weight.max() > 0  # a step's positions hold fewer than all 24: a draw
    result = fit_output_rows(torch.zeros(24, 8), at, capped, seed=0)
    assert result.summary["rows_per_step"] == 8 and result.summary["positions_per_step"] == 32
    exact = fit_output_rows(torch.zeros(24, 8), at, replace(capped, max_step_logits=10**6), seed=0)
    assert exact.summary["rows_per_step"] == 24
    held = at.held_back.nonzero().squeeze(1)
    sampled_loss, exact_loss = (position_losses(r.rows, at, held).mean() for r in (result, exact))
    assert exact_loss < position_losses(true_new, at, held).mean() + 0.05
    assert sampled_loss < exact_loss + 0.03


def test_a_token_that_never_follows_loses_its_mass_and_one_that_does_gets_its_share():
    at, _, true_new, _, _ = _positions()
    only_first = FitPositions(at.hidden, at.old_log_norm, torch.where(at.new_target == 1, -1, at.new_target), at.held_back,
                              at.weight)

    def mass(rows):  # mean probability of each new token over the positions
        logits = torch.cat([at.old_log_norm[:, None], at.hidden @ rows.T], -1)
        return logits.softmax(-1)[:, 1:].mean(0)

    start = true_new  # both tokens as likely as in the text drawn from them
    rows = fit_output_rows(start, only_first, OutputFitConfig(learning_rate=0.05, max_steps=600), 0).rows
    assert mass(rows)[1] < 0.1 * mass(start)[1]
    share = (only_first.new_target == 0).float().mean()
    assert abs(mass(rows)[0] - share) < 0.3 * share


def test_positions_weighted_down_count_less_toward_their_token():
    """A weight w on a position counts it as w positions: windows, which hold their token
    wherever the text does not, weighted down leave the token less mass."""
    at, _, _, _, _ = _positions()
    settings = OutputFitConfig(learning_rate=0.05, max_steps=600, batch_positions=1024)

    def mass_of_token_1(weight_before_it: float) -> float:
        weight = torch.where(at.new_target == 1, weight_before_it, 1.0)
        rows = fit_output_rows(torch.zeros(2, 8), replace(at, weight=weight), settings, 0).rows
        logits = torch.cat([at.old_log_norm[:, None], at.hidden @ rows.T], -1)
        return float(logits.softmax(-1)[:, 2].mean())

    share = float((at.new_target == 1).float().mean())
    assert abs(mass_of_token_1(1.0) - share) < 0.3 * share
    assert mass_of_token_1(0.2) < 0.75 * mass_of_token_1(1.0)


def test_fit_without_held_back_text_leaves_the_rows_and_says_why():
    at, _, _, _, _ = _positions(n=9)  # chunks 0..8: none is held back
    start = torch.randn(2, 8)
    result = fit_output_rows(start, at, OutputFitConfig(), 0)
    assert torch.equal(result.rows, start) and "skipped" in result.summary


@pytest.mark.parametrize("tied", [False, True])
def test_fit_on_text_changes_only_the_new_output_rows(tiny_model_dir, tied):
    model = load_model(tiny_model_dir(tied=tied))
    from transformers import AutoTokenizer

    expansion = expand_with_merges(AutoTokenizer.from_pretrained(tiny_model_dir(tied=tied)), WORDS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_new, d = len(expansion.tokens), model.config.hidden_size
    rows = {"input": torch.randn(n_new, d) * 0.02}
    if not tied:
        rows["output"] = torch.randn(n_new, d) * 0.02
    texts = SENTENCES * 4  # 10 % held back: some chunks are
    fitted, summary = fit_on_text(model, rows, expansion.new_start, expansion.tokenizer, texts,
                                  OutputFitConfig(max_steps=50), seed=0, mixed_precision=False)
    assert torch.equal(fitted["input"], rows["input"])
    assert not torch.equal(fitted["output"], rows.get("output", rows["input"]))
    assert summary["before_new_tokens"] > 0 and summary["chunks"] == len(texts)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_reading_passes_group_similar_lengths_within_the_position_budget():
    lengths = [500, 30, 520, 33, 4100, 31, 510, 29] * 5
    passes = reading_passes([[0] * n for n in lengths])
    assert sorted(i for batch in passes for i in batch) == list(range(len(lengths)))  # each chunk read once
    assert all(len(batch) * max(lengths[i] for i in batch) <= POSITIONS_PER_PASS or len(batch) == 1 for batch in passes)
    assert [lengths[i] for i in passes[-1]] == [4100]  # a chunk over the budget alone
    assert len(passes) == 1 + 2 + 5  # the 20 snippets in one pass, the 15 chunks of ~500 eight to a pass


def test_windows_are_read_as_the_text_they_were_cut_from(tiny_model_dir):
    """The fit's positions from a mined window are those of the same ids read as fit text:
    the summary counts them, and the rows fitted on text alone or on the same ids as
    windows are the same."""
    from transformers import AutoTokenizer

    model = load_model(tiny_model_dir(tied=False))
    expansion = expand_with_merges(AutoTokenizer.from_pretrained(tiny_model_dir(tied=False)), WORDS)
    n_new, d = len(expansion.tokens), model.config.hidden_size
    rows = {"input": torch.randn(n_new, d) * 0.02, "output": torch.randn(n_new, d) * 0.02}
    texts = SENTENCES * 4
    settings = OutputFitConfig(max_steps=50)
    on_text, text_summary = fit_on_text(model, rows, expansion.new_start, expansion.tokenizer, texts, settings,
                                        seed=0, mixed_precision=False)
    windows = fit_chunk_ids(expansion.tokenizer, texts, start_token(expansion.tokenizer), None)
    on_windows, summary = fit_on_text(model, rows, expansion.new_start, expansion.tokenizer, [], settings, seed=0,
                                      mixed_precision=False, windows=windows)
    assert summary["snippet_windows"] == len(windows) and summary["positions"] == text_summary["positions"]
    assert summary["before_new_tokens"] == text_summary["before_new_tokens"] > 0
    torch.testing.assert_close(on_windows["output"], on_text["output"])


def test_the_fit_is_checked_on_held_back_text_and_fits_every_window(tiny_model_dir):
    """Windows over-represent their tokens, so the check that picks the rows reads held-back
    chunks of the fit text only: adding windows leaves its starting loss as it was. With too
    little text for a held-back chunk, every tenth window is held back instead."""
    from transformers import AutoTokenizer

    model = load_model(tiny_model_dir(tied=False))
    expansion = expand_with_merges(AutoTokenizer.from_pretrained(tiny_model_dir(tied=False)), WORDS)
    n_new, d = len(expansion.tokens), model.config.hidden_size
    rows = {"input": torch.randn(n_new, d) * 0.02, "output": torch.randn(n_new, d) * 0.02}
    texts = SENTENCES * 4
    windows = fit_chunk_ids(expansion.tokenizer, SENTENCES * 2, start_token(expansion.tokenizer), None)
    settings = OutputFitConfig(max_steps=25)
    _, alone = fit_on_text(model, rows, expansion.new_start, expansion.tokenizer, texts, settings, seed=0,
                           mixed_precision=False)
    _, with_windows = fit_on_text(model, rows, expansion.new_start, expansion.tokenizer, texts, settings, seed=0,
                                  mixed_precision=False, windows=windows)
    assert with_windows["positions"] > alone["positions"]
    assert with_windows["held_back_loss_start"] == pytest.approx(alone["held_back_loss_start"], rel=1e-6)

    share = fit_sequences(model, expansion.tokenizer, texts, windows)
    assert not any(share.held_back[len(texts):]) and share.held_back[9]
    short = fit_sequences(model, expansion.tokenizer, texts[:5], windows)
    assert [i for i, held in enumerate(short.held_back) if held] == [9]  # the fifth window


def test_text_sample_spreads_over_the_corpus_and_skips_rows_without_text(tmp_path):
    lines = [f"document {i} " + "x" * 20 for i in range(40)]
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as f:
        for i, line in enumerate(lines):
            f.write('{"text": null}\n' if i == 3 else f'{{"text": "{line}"}}\n')
    source = FileDataSource(paths=str(tmp_path / "docs.jsonl.gz"))
    every_fourth = text_sample(source, text_bytes=10_000, stride=4)
    kept = [line for i, line in enumerate(lines) if i != 3]
    assert every_fourth == kept[::4]
    assert text_sample(source, text_bytes=60, stride=1) == kept[:2]  # stops once it has the bytes


def test_the_fit_reads_text_until_the_median_new_token_occurs_often_enough(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from tokdist_ray.stages import fit_text

    # each document holds the first word once, and every other one the second word too
    docs = [f"Part {i}. The{WORDS[0]} came back." + (f" A{WORDS[1]} too." if i % 2 else "") for i in range(40)]
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    expansion = expand_with_merges(AutoTokenizer.from_pretrained(tiny_tokenizer_dir()), WORDS[:2])
    assert expansion.n_requested == 2  # the median is the mean of the two words' counts (intermediates aside)
    source, report = FileDataSource(paths=str(tmp_path)), {"mining": {"megabytes": 0}}
    texts = fit_text(source, OutputFitConfig(occurrences_per_token=6), report, expansion)
    # after n documents the words occur n and n // 2 times: the median reaches 6 at the 8th
    assert texts == docs[:8]
    everything = fit_text(source, OutputFitConfig(occurrences_per_token=1000, text_bytes=10**6), report, expansion)
    assert everything == docs  # never enough: all the text up to text_bytes


def test_output_fit_settings_are_checked():
    with pytest.raises(ConfigError, match="output_fit.text_bytes"):
        OutputFitConfig(text_bytes=0)
    with pytest.raises(ConfigError, match="output_fit.learning_rate"):
        OutputFitConfig(learning_rate=float("nan"))
    with pytest.raises(ConfigError, match="output_fit.window_weight"):
        OutputFitConfig(window_weight=0)
    with pytest.raises(ConfigError, match="output_fit.enabled"):
        OutputFitConfig(enabled="yes")
