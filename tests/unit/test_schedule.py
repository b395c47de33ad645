"""The step schedule, the stop rule and the strategy choice: pure pieces, no Ray."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokdist_ray.config import DistillationConfig, DistributedConfig
from tokdist_ray.training.schedule import SnippetSchedule, epoch_order
from tokdist_ray.training.strategies import model_bytes, pick_strategy


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


def test_auto_picks_ddp_when_the_model_fits_and_zero3_when_it_does_not(tiny_model_dir):
    size = model_bytes(str(tiny_model_dir(tied=False)), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tied=False))
    assert size == 4 * sum(p.numel() for p in model.parameters())
    assert pick_strategy(size, worker_bytes=10 * size) == ("ddp", None)
    assert pick_strategy(size, worker_bytes=size) == ("deepspeed", 3)


@pytest.mark.parametrize("epochs,max_steps,budget_hit,step,reason", [
    (1, None, False, 4, "completed"), (2, 3, False, 3, "max_steps"), (1, None, True, 2, "time_budget"),
    (1, None, False, 3, None),
])
def test_one_stop_rule_for_every_loop(epochs, max_steps, budget_hit, step, reason):
    schedule = SnippetSchedule(n_snippets=13, global_batch=4, seed=0)
    cfg = DistillationConfig(epochs=epochs, batch_size=4, max_steps=max_steps)
    assert schedule.stop_reason(step, cfg, over_budget=budget_hit) == reason
