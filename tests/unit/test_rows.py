"""Pre-initialisation heuristics."""

import math

import torch

from tokdist_ray.training.rows import pre_init_rows


def test_fvt_is_the_subtoken_mean():
    table = torch.randn(10, 4)
    rows = pre_init_rows(table, [[1, 2], [3, 4, 5]], "fvt")
    torch.testing.assert_close(rows[0], table[[1, 2]].mean(0))
    torch.testing.assert_close(rows[1], table[[3, 4, 5]].mean(0))


def test_adaptivocab_weights_later_subtokens_for_inputs_and_earlier_for_outputs():
    table = torch.eye(3)
    inputs = pre_init_rows(table, [[0, 1, 2]], "adapti-vocab", "input")[0]
    outputs = pre_init_rows(table, [[0, 1, 2]], "adapti-vocab", "output")[0]
    expected = torch.tensor([math.exp(2 * i) for i in (1, 2, 3)])
    torch.testing.assert_close(inputs, (expected / expected.sum()).float())
    torch.testing.assert_close(outputs, inputs.flip(0))


def test_long_phrases_do_not_overflow():
    rows = pre_init_rows(torch.ones(5, 2), [[0, 1, 2, 3, 4] * 100], "adapti-vocab")
    assert torch.isfinite(rows).all()
    torch.testing.assert_close(rows[0], torch.ones(2))


def test_output_rows_from_the_first_piece_stay_fixed_and_others_train_from_the_mix(tiny_model_dir):
    from tokdist_ray.config import OutputEmbeddingInit
    from tokdist_ray.training.rows import initial_rows
    from tokdist_ray.vocab.models import load_model

    model = load_model(tiny_model_dir(tied=True))
    phrases = [[5, 9, 11], [7, 3]]
    table = model.get_input_embeddings().weight
    first = initial_rows(model, phrases, OutputEmbeddingInit.FIRST_PIECE, "fvt", untie=True)
    assert not first.trains_output and torch.equal(first.output, table[[5, 7]].float())
    trained = initial_rows(model, phrases, OutputEmbeddingInit.TRAIN_WITH_CE, "fvt", untie=True)
    assert trained.trains_output and torch.allclose(trained.output[1], table[[7, 3]].float().mean(0))
    assert torch.equal(first.input, trained.input)  # the input side does not change
    assert initial_rows(model, phrases, OutputEmbeddingInit.FIRST_PIECE, "fvt").output is None  # tied, not untied
