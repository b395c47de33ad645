"""The distillation step: losses, alignment, target layer, what is and is not trained."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import tiny_setup
from tokdist_ray.config import NEW_TOKEN_OUTPUT_LOSS, DistillationConfig
from tokdist_ray.training import step as distill
from tokdist_ray.training.batching import collate
from tokdist_ray.training.checkpoint import Progress
from tokdist_ray.training.loop import AlignedExamples, train_local, train_loop
from tokdist_ray.training.losses import LOSSES, check_methods
from tokdist_ray.training.progress import TrainingHistory
from tokdist_ray.training.schedule import SnippetSchedule, make_optimizer
from tokdist_ray.training.strategies import Local


def _manual_hidden_mse(distiller, batch, layer):
    """The loss computed the slow, obvious way: full model runs, hidden_states[layer]."""
    model = distiller.model
    with torch.no_grad():
        teacher = model(batch["teacher_ids"], output_hidden_states=True).hidden_states[layer]
        ids = batch["student_ids"]
        embeds = model.get_input_embeddings()(ids.clamp(max=distiller.new_start - 1)).clone()
        new = ids >= distiller.new_start
        embeds[new] = distiller.rows.input[ids[new] - distiller.new_start]
        student = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[layer]
    mask = batch["student_mask"]
    aligned = torch.stack([teacher[b, batch["teacher_index"][b]] for b in range(len(ids))])
    return F.mse_loss(student[mask], aligned[mask])


@pytest.mark.parametrize("tied", [True, False])
def test_hidden_mse_matches_a_full_model_computation(tiny_model_dir, tied):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=tied))
    batch = collate(examples)
    loss = distiller(batch)["MSE-on-hiddens"]  # untied models add the output rows' CE to "loss"
    torch.testing.assert_close(loss, _manual_hidden_mse(distiller, batch, -1))
    assert loss > 0


def test_target_layer_stops_early_and_equals_slicing_the_full_run(tiny_model_dir):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=True), target_layer=1)
    calls = {"last_layer": 0, "lm_head": 0}
    model = distiller.model
    model.model.layers[1].register_forward_hook(lambda *a: calls.__setitem__("last_layer", calls["last_layer"] + 1))
    model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1))
    batch = collate(examples)
    loss = distiller(batch)["loss"]
    assert calls == {"last_layer": 0, "lm_head": 0}
    torch.testing.assert_close(loss, _manual_hidden_mse(distiller, batch, 1))


def test_target_layer_out_of_range_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match="out of range"):
        tiny_setup(tiny_model_dir(tied=True), target_layer=5)


@pytest.mark.parametrize("losses", [[m] for m in LOSSES if m != "CE-auto-weighted"] + [["MSE-on-hiddens", "CE-auto-weighted"]])
@pytest.mark.parametrize("tied", [True, False])
def test_every_loss_trains_only_the_new_rows(tiny_model_dir, losses, tied):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=tied), losses=losses)
    out = distiller(collate(examples))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    grad = distiller.rows.input.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in distiller.model.parameters())


def test_ce_auto_weighted_matches_the_other_losses_magnitude(tiny_model_dir):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=True), losses=["MSE-on-hiddens", "CE-auto-weighted"])
    out = distiller(collate(examples))
    torch.testing.assert_close(out["loss"], 2 * out["MSE-on-hiddens"])


def test_untied_output_rows_learn_only_from_their_own_ce(tiny_model_dir):
    trained, examples, _ = tiny_setup(tiny_model_dir(tied=False), train_output=True)
    fixed, _, _ = tiny_setup(tiny_model_dir(tied=False), train_output=False)
    batch = collate(examples)
    trained(batch)["loss"].backward()
    fixed(batch)["loss"].backward()
    assert trained.rows.output.grad.abs().sum() > 0
    # the output rows' CE term leaves the input rows' gradient untouched
    torch.testing.assert_close(trained.rows.input.grad, fixed.rows.input.grad)


def test_training_lowers_the_loss_and_moves_output_rows(tiny_model_dir):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=False))
    before = distiller(collate(examples))
    out_before = distiller.rows.output.detach().clone()
    train_local(distiller, examples, DistillationConfig(epochs=20, batch_size=2, learning_rate=1e-2, log_every=1000))
    after = distiller(collate(examples))
    assert after["MSE-on-hiddens"] < 0.5 * before["MSE-on-hiddens"]
    assert after["CE-output-rows"] < before["CE-output-rows"]
    assert not torch.equal(out_before, distiller.rows.output.detach())


def test_optimizer_state_scales_with_new_tokens_not_vocabulary(tiny_model_dir):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=True))
    params = [p for p in distiller.parameters() if p.requires_grad]
    assert params == [distiller.rows.input]
    optimizer, _ = make_optimizer(params, DistillationConfig(), 1)
    distiller(collate(examples))["loss"].backward()
    optimizer.step()
    shapes = {tuple(v.shape) for s in optimizer.state.values() for v in s.values() if v.dim()}
    assert shapes == {tuple(distiller.rows.input.shape)}
    assert distiller.rows.input.shape[1] == 64 and distiller.rows.input.shape[0] < 100  # new ids only


def test_linear_schedule_warms_up_then_decays():
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer, schedule = make_optimizer([p], DistillationConfig(lr_schedule="linear", warmup_ratio=0.2), 10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] < lrs[1] == max(lrs) and lrs[-1] < lrs[2]


def test_bf16_autocast_path_runs(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(distill, "bf16_supported", lambda device: True)
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=True))
    distiller.mixed_precision = True
    out = distiller(collate(examples))
    out["loss"].backward()
    assert distiller.rows.input.dtype == torch.float32 and torch.isfinite(distiller.rows.input.grad).all()


def test_config_typos_are_named():
    # loss names are checked against the registry of losses, by every runner before any work
    with pytest.raises(ValueError, match="unknown loss method"):
        check_methods(DistillationConfig(loss_methods=["MSE"]).loss_methods)
    with pytest.raises(ValueError, match="lr_schedule"):
        DistillationConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="CE-auto-weighted"):
        check_methods(DistillationConfig(loss_methods=["CE-auto-weighted"]).loss_methods)


@pytest.mark.parametrize(
    "losses", [["MSE-on-hiddens"], ["KL-on-logits"], ["MSE-on-hiddens", "CE-auto-weighted"], ["MSE-on-hiddens", NEW_TOKEN_OUTPUT_LOSS]]
)
@pytest.mark.parametrize("tied,target_layer", [(True, -1), (False, -1), (True, 1)])
def test_reusing_the_teachers_prefix_changes_neither_loss_nor_gradient(tiny_model_dir, losses, tied, target_layer):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=tied), losses=losses, target_layer=target_layer)
    batch = collate(examples)
    split = distiller.shared_prefix(batch["student_ids"], batch["student_mask"])
    assert split > 1
    results = []
    for reuse in (True, False):
        distiller.reuse_prefix = reuse
        distiller.rows.zero_grad()
        out = distiller(batch)
        out["loss"].backward()
        results.append((out["loss"].detach(), distiller.rows.input.grad.clone(), out["prefix_skipped"]))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    mask = batch["student_mask"]
    # with CE the student runs past the target layer and the teacher does not: no reuse
    reused = target_layer == -1 or "CE-auto-weighted" not in losses
    assert results[0][2] == (mask[:, :split].sum() / mask.sum() if reused else 0)
    assert results[1][2] == 0


def test_a_run_the_budget_stopped_takes_no_further_step_when_continued(tiny_model_dir):
    # continued for its output fit, or after a crash once its last checkpoint was written
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=True))  # 4 snippets: 2 steps per epoch
    snippets = AlignedExamples(examples)

    def continued(budget_s: float) -> tuple[int, bool]:
        cfg = DistillationConfig(epochs=10, batch_size=2, time_budget_s=budget_s)
        schedule = SnippetSchedule.for_run(snippets.student_ids, distiller.new_start, cfg)
        optimizer, lr = make_optimizer([p for p in distiller.parameters() if p.requires_grad], cfg,
                                       schedule.total_steps(cfg))
        stopped = Progress(step=3, history=TrainingHistory(steps=3, seconds=60.0, stopped_by="time_budget"))
        progress, rows = train_loop(Local(distiller, optimizer, lr), snippets, schedule, cfg, stopped)
        return progress.step, rows is not None

    assert continued(60.0) == (3, False)  # no rows of its own: the checkpoint's stand
    assert continued(3600.0) == (20, True)  # a raised budget trains on, to the end of the epochs


def test_a_compute_budget_stops_training_and_bounds_the_eta(tiny_model_dir, caplog):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=True))  # 4 snippets: 2 steps per epoch
    by_steps = train_local(distiller, examples, DistillationConfig(epochs=10, batch_size=2, max_steps=3, log_every=1))
    assert (by_steps.steps, by_steps.stopped_by) == (3, "max_steps")
    with caplog.at_level("INFO", logger="tokdist_ray"):
        by_time = train_local(distiller, examples, DistillationConfig(epochs=1000, batch_size=2, time_budget_s=1e-6, log_every=1))
    assert (by_time.steps, by_time.stopped_by) == (1, "time_budget")
    # without the budget the ETA would be 1,999 steps away
    assert caplog.records[-1].getMessage().endswith("eta 0s")
