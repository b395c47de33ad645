"""The step schedule, the stop rule and the strategy choice: pure pieces, no Ray."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokdist_ray.config import DistillationConfig, DistributedConfig, OutputEmbeddingInit
from tokdist_ray.errors import ConfigError
from tokdist_ray.training.schedule import SnippetSchedule, epoch_order, first_new_positions
from tokdist_ray.training.strategies import memory_need, model_bytes, pick_strategy


def test_every_snippet_is_trained_once_per_epoch_in_the_single_process_batches():
    schedule = SnippetSchedule(n_snippets=13, global_batch=4, seed=3)
    for epoch in range(2):
        steps = range(epoch * 4, epoch * 4 + 4)
        globals_ = [schedule.global_indices(s) for s in steps]
        order = epoch_order(13, 3, epoch)
        assert globals_ == [order[i : i + 4] for i in range(0, 13, 4)]
        for step, batch in zip(steps, globals_):
            assert sum((schedule.rank_indices(step, r, 2) for r in range(2)), []) == batch
    assert schedule.rank_indices(3, 1, 2) == []  # the short last batch: one snippet, rank 0 has it


NEW_START = 100


def _snippets(n: int = 203, length: int = 40, seed: int = 0) -> list[list[int]]:
    """Snippets of old ids (< NEW_START) with a new id at a random first position, some
    with later new ids too, and a few with none."""
    g = torch.Generator().manual_seed(seed)
    snippets = []
    for _ in range(n):
        ids = torch.randint(0, NEW_START, (length,), generator=g)
        first = int(torch.randint(1, length + 8, (1,), generator=g))  # past the end: no new id
        ids[first:] = torch.where(torch.rand(length - min(first, length), generator=g) < 0.3, NEW_START + 1, ids[first:])
        if first < length:
            ids[first] = NEW_START
        snippets.append(ids.tolist())
    return snippets


def _grouped(snippets, batch: int = 8, seed: int = 3) -> SnippetSchedule:
    return SnippetSchedule.for_run(snippets, NEW_START, DistillationConfig(batch_size=batch, seed=seed))


def test_first_new_positions_find_the_first_new_id_or_the_length():
    assert first_new_positions([[1, 2, 100, 101], [100], [5, 6, 7]], NEW_START) == [2, 0, 3]


def test_grouped_batches_train_every_snippet_once_per_epoch_in_batches_of_the_global_size():
    schedule = _grouped(_snippets())
    for epoch in range(2):
        batches = [schedule.global_indices(epoch * 26 + b) for b in range(26)]
        assert sorted(sum(batches, [])) == list(range(203))
        assert sorted(len(b) for b in batches) == [3] + [8] * 25
        step = epoch * 26 + next(i for i, b in enumerate(batches) if len(b) == 3)
        assert sum((schedule.rank_indices(step, r, 4) for r in range(4)), []) == schedule.global_indices(step)


def test_grouped_order_is_a_function_of_seed_and_epoch_and_differs_between_epochs():
    snippets = _snippets()
    order = [_grouped(snippets).global_indices(s) for s in range(52)]
    assert order == [_grouped(snippets).global_indices(s) for s in range(52)]
    assert order[:26] != order[26:]
    assert [set(b) for b in order[:26]] != [set(b) for b in order[26:]]  # new groups, not just a new batch order
    assert order != [_grouped(snippets, seed=4).global_indices(s) for s in range(52)]


def test_grouped_batches_share_a_longer_prefix_than_random_ones():
    snippets = _snippets()
    first = first_new_positions(snippets, NEW_START)
    random = SnippetSchedule.for_run(snippets, NEW_START, DistillationConfig(batch_size=8, batch_grouping="random"))
    assert random.first_new is None

    def mean_prefix(schedule):
        return sum(min(first[i] for i in schedule.global_indices(s)) for s in range(26)) / 26

    grouped = mean_prefix(_grouped(snippets))
    assert grouped > 2 * mean_prefix(random)
    assert grouped > 0.9 * sum(first) / len(first)  # close to each snippet's own first new token


def test_a_resumed_schedule_lands_on_the_same_snippets():
    snippets = _snippets()
    walked = _grouped(snippets)
    seen = [walked.global_indices(s) for s in range(60)]
    resumed = _grouped(snippets)  # a fresh process restarting at step 37
    assert [resumed.global_indices(s) for s in range(37, 60)] == seen[37:]


def test_an_unknown_batch_grouping_is_a_config_error():
    with pytest.raises(ConfigError, match=r"batch_grouping must be one of \('first_new_token', 'random'\), got 'length'"):
        DistillationConfig(batch_grouping="length")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(strategy="fsdp"), r"strategy must be one of \('auto', 'ddp', 'deepspeed'\), got 'fsdp'"),
        (dict(strategy="ddp", zero_stage=3), "zero_stage=3 applies only to strategy='deepspeed'"),
        (dict(strategy="deepspeed", zero_stage=4), r"zero_stage must be one of \(1, 2, 3\)"),
        (dict(num_workers=0), "num_workers must be an int >= 1"),
        (dict(checkpoint_every=-1), "checkpoint_every must be an int >= 0"),
        (dict(max_failures=-2), "max_failures must be an int >= -1"),
        (dict(run_name="a/b"), "run_name must be a non-empty name without '/'"),
    ],
)
def test_config_errors_name_the_field_and_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistributedConfig(**kwargs)


def test_auto_counts_weights_row_state_and_activations(tiny_model_dir):
    path = str(tiny_model_dir(tied=False))
    size = model_bytes(path, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert size == 4 * sum(p.numel() for p in model.parameters())
    cfg = DistillationConfig(batch_size=8)
    need = memory_need(path, torch.float32, 1000, cfg, 51, OutputEmbeddingInit.TRAIN_WITH_CE)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    assert need.weights == size and need.rows == 1000 * hidden * 16 * 2  # input and output rows, trained
    assert need.activations > 8 * 51 * layers * hidden * 34  # fp32 hiddens to the last layer, and logits for CE
    frozen_output = memory_need(path, torch.float32, 1000, cfg, 51, OutputEmbeddingInit.ZERO)
    assert frozen_output.rows == need.rows // 2 and frozen_output.activations < need.activations
    shallow = memory_need(path, torch.float32, 1000, DistillationConfig(batch_size=8, target_layer=1), 51,
                          OutputEmbeddingInit.ZERO)
    assert shallow.activations < frozen_output.activations
    # 16-bit weights: the head is multiplied in fp32, a copy of it kept for the backward pass
    half = memory_need(path, torch.bfloat16, 1000, cfg, 51, OutputEmbeddingInit.TRAIN_WITH_CE)
    vocab = model.config.vocab_size
    per_token = 8 * 51 * layers * hidden * 34
    assert half.activations - per_token == need.activations - per_token * 2 + vocab * hidden * 4
    assert pick_strategy(need, worker_bytes=2 * need.total) == ("ddp", None)
    # the weights alone fit, as the old rule counted, but not with the rows' state and activations
    assert pick_strategy(need, worker_bytes=int(1.01 * need.weights / 0.75)) == ("deepspeed", 3)


@pytest.mark.parametrize("epochs,max_steps,budget_hit,step,reason", [
    (1, None, False, 4, "completed"), (2, 3, False, 3, "max_steps"), (1, None, True, 2, "time_budget"),
    (1, None, False, 3, None),
])
def test_one_stop_rule_for_every_loop(epochs, max_steps, budget_hit, step, reason):
    schedule = SnippetSchedule(n_snippets=13, global_batch=4, seed=0)
    cfg = DistillationConfig(epochs=epochs, batch_size=4, max_steps=max_steps)
    assert schedule.stop_reason(step, cfg, over_budget=budget_hit) == reason


def test_a_workers_arrow_snippets_give_the_schedule_and_counts_of_python_lists(tmp_path):
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokdist_ray.training.distilled_rows import positions_per_token
    from tokdist_ray.training.snippet_files import corpus_windows, read_snippets

    rng = random.Random(0)
    rows = [{"token": f"t{rng.randrange(4)}", "input_ids": [rng.choice([1, 2, 3, 100, 101, 102]) for _ in range(rng.randrange(1, 9))],
             "source": rng.choice(["corpus", "generated"])} for _ in range(200)]
    pq.write_table(pa.Table.from_pylist(rows[:120]), tmp_path / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[120:]), tmp_path / "part-1.parquet")
    snippets = read_snippets(str(tmp_path), ["t0", "t2"])
    kept = [r for r in rows if r["token"] in ("t0", "t2")]
    assert isinstance(snippets.ids, pa.ListArray) and snippets.ids.to_pylist() == [r["input_ids"] for r in kept]
    assert snippets.counts == {t: sum(r["token"] == t for r in kept) for t in ("t0", "t2")}
    # what the fit reads: 3 of each token's mined snippets, in one order whatever the files'
    from_corpus = sorted((r["token"], r["input_ids"]) for r in kept if r["source"] == "corpus")
    assert snippets.corpus_windows(3) == [ids for i, (token, ids) in enumerate(from_corpus)
                                          if sum(t == token for t, _ in from_corpus[:i]) < 3]
    shuffled = read_snippets(str(tmp_path), ["t2", "t0"])  # files read in the other order give the same
    reordered = [shuffled.token, shuffled.ids, shuffled.source]
    order = pa.array(list(range(len(shuffled.ids)))[::-1])
    assert corpus_windows(*(column.take(order) for column in reordered), 3) == snippets.corpus_windows(3)
    assert snippets.corpus_windows(0) == []
    lists = [r["input_ids"] for r in kept]
    for arrow in (snippets.ids, snippets.ids.slice(7, 50)):  # a slice's offsets start past 0
        python = arrow.to_pylist()
        assert first_new_positions(arrow, NEW_START) == first_new_positions(python, NEW_START)
        assert positions_per_token(arrow, NEW_START, 3) == [sum(i == NEW_START + k for ids in python for i in ids)
                                                            for k in range(3)]
    cfg = DistillationConfig(batch_size=8, seed=3)
    assert SnippetSchedule.for_run(snippets.ids, NEW_START, cfg) == SnippetSchedule.for_run(lists, NEW_START, cfg)
