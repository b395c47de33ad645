"""Generation side by side: equal decode steps, bytes per step from the decoded text, and
the share of generated ids that are new tokens."""

import torch
from transformers import AutoTokenizer

from tokdist_ray.eval.generation import (
    MODES,
    compare_generation,
    heldout_new_token_share,
    markdown_table,
    original_vocabulary,
    prompts_from,
)
from tokdist_ray.export.hf import expand_model
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import load_model

TEXTS = ["short", "The weather today is mild, with a light wind from the west and rain later in the day.",
         "Trains leave the central station every ten minutes during the day and every hour at night."]


def test_prompts_are_cut_before_a_space_and_skip_short_texts():
    prompts = prompts_from(TEXTS, n_prompts=5, prompt_bytes=40)
    assert len(prompts) == 2 and prompts[0] == "The weather today is mild, with a light"
    assert all(len(p.encode()) <= 40 and not p.endswith(" ") for p in prompts)
    assert prompts_from(TEXTS, n_prompts=1, prompt_bytes=40) == prompts[:1]


def test_both_sides_decode_the_same_steps_and_count_new_ids(tiny_model_dir):
    model_dir = tiny_model_dir(tied=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir)
    prompts = prompts_from(TEXTS, 2, 40)
    expansion = expand_with_merges(tokenizer, [" weather", " station"])
    new_start = expansion.new_start
    # a first new row that makes it the most likely next token everywhere
    rows = torch.zeros(len(expansion.tokens), model.config.hidden_size)
    rows[0] = 50 * model.get_decoder()(torch.tensor([[1, 5, 9]])).last_hidden_state[0, -1].detach().sign()
    expand_model(model, new_start, rows)
    table = model.get_input_embeddings().weight

    report = compare_generation(model, tokenizer, expansion.tokenizer, new_start, prompts, steps=6, seed=0, rounds=1)
    original, expanded = report["original"], report["expanded"]
    for side in (original, expanded):
        for mode in MODES:
            assert side[mode]["decode_steps"] == 2 * 6
            assert side[mode]["bytes_per_step"] == side[mode]["bytes"] / 12
    assert "new_token_share" not in original["greedy"]
    assert expanded["greedy"]["new_token_share"] >= 0.5
    assert expanded["prompt_tokens"] < original["prompt_tokens"]  # " weather" and " station" are one id each now
    assert model.get_input_embeddings().weight is table and model.get_output_embeddings().weight is table  # restored
    ratio = report["ratios"]["greedy"]["bytes_per_step"]
    assert ratio == expanded["greedy"]["bytes_per_step"] / original["greedy"]["bytes_per_step"]
    report["heldout_new_token_share"] = heldout_new_token_share(expansion.tokenizer, TEXTS, new_start)
    assert 0 < report["heldout_new_token_share"] < 1
    assert "| greedy | expanded / original |" in markdown_table(report) and "Prefill:" in markdown_table(report)


def test_the_original_side_is_the_unexpanded_model(tiny_model_dir):
    """Generating under original_vocabulary gives the ids the model gave before it grew."""
    model_dir = tiny_model_dir(tied=False)
    model = load_model(model_dir)
    batch = {"input_ids": torch.tensor([[1, 7, 8, 9]]), "max_new_tokens": 5, "do_sample": False}
    before = model.generate(**batch)
    n = model.get_input_embeddings().weight.shape[0]
    expand_model(model, n, 30 * torch.ones(3, model.config.hidden_size), 30 * torch.ones(3, model.config.hidden_size))
    assert (model.generate(**batch)[0, 4:] >= n).any()  # the new rows win when present
    with original_vocabulary(model, n):
        assert torch.equal(model.generate(**batch), before)
    assert model.get_output_embeddings().weight.shape[0] == n + 3
