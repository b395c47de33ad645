"""The loss registry: what each loss declares it reads is what the step computes, the
config and memory planning read the same registry, and every loss equals its formula."""

import pytest
import torch

from tests.helpers import tiny_setup
from tokdist_ray.config import NEW_TOKEN_OUTPUT_LOSS, DistillationConfig, OutputEmbeddingInit
from tokdist_ray.errors import ConfigError
from tokdist_ray.job.config import load_config, parse_overrides
from tokdist_ray.training import output_side
from tokdist_ray.training import step as distill
from tokdist_ray.training.batching import collate
from tokdist_ray.training.losses import FINAL, LOGITS, LOSSES, TARGET, Loss, check_methods
from tokdist_ray.training.strategies import memory_need


def _spy_on_runs_and_lm_head(distiller, monkeypatch):
    """Records (model, need_target, need_final) of every decoder run, and the positions of
    every LM-head product (head_logits: the lowest level, whoever calls it)."""
    runs, heads = [], []
    run = distiller.hidden_states

    def hidden_states(need_target, need_final, **kwargs):
        runs.append(("teacher" if "input_ids" in kwargs else "student", need_target, need_final))
        return run(need_target, need_final, **kwargs)

    def head_logits(hidden, *args):
        heads.append(len(hidden))
        return product(hidden, *args)

    product = output_side.head_logits
    distiller.hidden_states = hidden_states
    monkeypatch.setattr(distill, "head_logits", head_logits)
    monkeypatch.setattr(output_side, "head_logits", head_logits)
    return runs, heads


@pytest.mark.parametrize("name", list(LOSSES))
def test_what_a_loss_needs_is_what_the_step_computes(tiny_model_dir, monkeypatch, name):
    # target layer 1 of 2: the target-layer states and the final ones are different runs
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=True), target_layer=1)
    distiller.losses = (name,)  # alone (the config pairs CE-auto-weighted), to see its needs only
    batch = collate(examples)
    runs, heads = _spy_on_runs_and_lm_head(distiller, monkeypatch)
    distiller(batch)
    loss = LOSSES[name]
    depths = (TARGET in loss.needs, bool({FINAL, LOGITS} & loss.needs))
    assert {(model, *depths) for model in ("student", "teacher")} >= set(runs)
    assert {model for model, *_ in runs} == ({"student", "teacher"} if loss.reads_teacher else {"student"})
    # LOGITS: the LM head at every position; without it, at a few positions or none
    every_position = int(batch["student_mask"][:, 1:].sum())
    assert any(n >= every_position for n in heads) == (LOGITS in loss.needs), heads


@pytest.mark.parametrize("name,runs", [
    ("MSE-on-hiddens", {("teacher", True, False), ("student", True, False)}),  # no last layer, no LM head
    ("KL-on-logits", {("teacher", False, True), ("student", False, True)}),
    ("CE", {("student", False, True)}),  # its own next tokens: no teacher
    (NEW_TOKEN_OUTPUT_LOSS, {("teacher", False, True), ("student", False, True)}),
])
def test_the_losses_declare_what_they_read(tiny_model_dir, monkeypatch, name, runs):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=True), losses=[name], target_layer=1)
    ran, heads = _spy_on_runs_and_lm_head(distiller, monkeypatch)
    distiller(collate(examples))
    assert set(ran) == runs and bool(heads) == (name != "MSE-on-hiddens")


@pytest.mark.parametrize("methods,unknown", [(["MSE", "CE"], ["MSE"]), (["mse-on-hiddens"], ["mse-on-hiddens"]),
                                             ([], "(none given)")])
def test_unknown_loss_names_are_refused_with_the_known_ones(tiny_model_dir, methods, unknown):
    # refused before any work: as the job's config is loaded, as the API's run checks it, by the step itself
    job = ["--tokens.list", " a", "--data.paths", "docs", "--training.loss_methods", ",".join(methods)]
    for build in ([lambda: load_config(None, parse_overrides(job))] if methods else []) + [
            lambda: check_methods(DistillationConfig(loss_methods=methods).loss_methods),
            lambda: tiny_setup(tiny_model_dir(tied=True), losses=methods)]:
        with pytest.raises(ConfigError) as caught:
            build()
        assert str(caught.value).removeprefix("training: ") == \
            f"unknown loss method(s) {unknown}; choose from {tuple(LOSSES)}"
    assert NEW_TOKEN_OUTPUT_LOSS in LOSSES and "CE-auto-weighted" in str(caught.value)


class StudentLogSumExp(Loss):
    """A toy loss: the student's mean log-partition over the original vocabulary."""

    name, needs = "toy-logsumexp", frozenset({FINAL, LOGITS})
    reads_teacher = False

    def compute(self, states):
        return states.distiller.original_logits(states.student.final[states.mask]).logsumexp(-1).mean()


def test_a_registered_loss_is_validated_computed_and_planned(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(LOSSES, StudentLogSumExp.name, StudentLogSumExp())
    methods = ["MSE-on-hiddens", StudentLogSumExp.name]
    cfg = DistillationConfig(loss_methods=methods, batch_size=4)
    assert "toy-logsumexp" in str(pytest.raises(ConfigError, check_methods, ["toy"]).value)

    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=True), losses=methods)
    batch = collate(examples)
    out = distiller(batch)
    out["loss"].backward()
    with torch.no_grad():
        student = _full_runs(distiller, batch)[1][-1]
        head = distiller.model.lm_head.weight[: distiller.new_start]
        expected = (student[batch["student_mask"]] @ head.T).logsumexp(-1).mean()
    torch.testing.assert_close(out["toy-logsumexp"], expected)
    torch.testing.assert_close(out["loss"], out["MSE-on-hiddens"] + out["toy-logsumexp"])
    assert distiller.rows.input.grad.abs().sum() > 0

    # planning counts its logits from its declaration: [tokens, vocab + new] fp32, three of them
    path, tokens, n_new = str(tiny_model_dir(tied=True)), 20, 10
    vocab = distiller.model.config.vocab_size
    plan = memory_need(path, torch.float32, n_new, cfg, tokens, OutputEmbeddingInit.ZERO)
    without = memory_need(path, torch.float32, n_new, DistillationConfig(loss_methods=["MSE-on-hiddens"], batch_size=4),
                          tokens, OutputEmbeddingInit.ZERO)
    assert plan.activations - without.activations == 3 * 4 * tokens * (vocab + n_new) * 4
    monkeypatch.setattr(StudentLogSumExp, "needs", frozenset({FINAL}))
    assert memory_need(path, torch.float32, n_new, cfg, tokens, OutputEmbeddingInit.ZERO) == without


# ---------------------------------------------------------------------------- the formulas
def _full_runs(distiller, batch):
    """Hidden states of every layer, teacher and student, from plain full-model runs."""
    model = distiller.model
    with torch.no_grad():
        teacher = model(batch["teacher_ids"], output_hidden_states=True).hidden_states
        ids = batch["student_ids"]
        embeds = model.get_input_embeddings()(ids.clamp(max=distiller.new_start - 1)).clone()
        new = ids >= distiller.new_start
        embeds[new] = distiller.rows.input[ids[new] - distiller.new_start]
        student = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
    return teacher, student


def _formulas(distiller, batch) -> dict[str, torch.Tensor]:
    """Every registered loss the slow, obvious way, one formula each."""
    teacher, student = _full_runs(distiller, batch)
    ids, t_ids, index, mask = batch["student_ids"], batch["teacher_ids"], batch["teacher_index"], batch["student_mask"]
    new_start = distiller.new_start

    def aligned(states):
        return torch.stack([states[b, index[b]] for b in range(len(ids))])[mask]

    head = distiller.model.lm_head.weight[:new_start]
    out_rows = torch.cat([head, distiller.rows.input if distiller.tied else distiller.rows.output])
    s_logits, t_logits = student[-1][mask] @ head.T, aligned(teacher[-1]) @ head.T
    t_log_p, s_log_p = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
    expanded = (student[-1] @ out_rows.T).log_softmax(-1)
    next_ok = mask[:, :-1] & mask[:, 1:]
    ce = -expanded[:, :-1][next_ok].gather(1, ids[:, 1:][next_ok][:, None]).mean()

    # the student's expanded distribution before each new token, against the teacher's with
    # the phrase's probability (the product of its pieces') moved from its first piece onto it
    teacher_log_p = (teacher[-1] @ head.T).log_softmax(-1)
    kls = []
    for b, j in next_ok.nonzero().tolist():
        if ids[b, j + 1] >= new_start:
            t0, t1 = int(index[b, j]), int(index[b, j + 1])
            phrase = sum(teacher_log_p[b, t, t_ids[b, t + 1]] for t in range(t0, t1)).exp()
            target = torch.cat([teacher_log_p[b, t0].exp(), torch.zeros(len(distiller.rows.input))])
            target[t_ids[b, t0 + 1]] -= phrase
            target[ids[b, j + 1]] = phrase
            kls.append((target * (target.clamp_min(1e-30).log() - expanded[b, j])).sum())
    assert len(kls) >= 4

    return {
        "MSE-on-hiddens": (student[-1][mask] - aligned(teacher[-1])).pow(2).mean(),
        "MSE-on-logits": (s_logits - t_logits).pow(2).mean(),
        "KL-on-logits": (t_log_p.exp() * (t_log_p - s_log_p)).sum(-1).mean(),
        NEW_TOKEN_OUTPUT_LOSS: torch.stack(kls).sum() / mask.sum(),
        "CE": ce,
        "CE-auto-weighted": ce,  # the CE term, scaled to the terms before it
    }


@pytest.mark.parametrize("tied", [True, False])
def test_every_registered_loss_equals_its_formula_and_the_total_weighs_them(tiny_model_dir, tied):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=tied), losses=list(LOSSES), train_output=False)
    distiller.new_token_output_weight = 0.4
    batch = collate(examples)
    out = distiller(batch)
    formulas = _formulas(distiller, batch)
    assert set(formulas) == set(LOSSES), "a registered loss without a formula here"
    assert list(out) == ["loss", "MSE-on-hiddens", "MSE-on-logits", "KL-on-logits", NEW_TOKEN_OUTPUT_LOSS, "CE",
                         "prefix_skipped"]
    for name, value in formulas.items():
        torch.testing.assert_close(out[LOSSES[name].part], value, rtol=1e-5, atol=0, msg=name)
    before_auto = sum(formulas[n] for n in ("MSE-on-hiddens", "MSE-on-logits", "KL-on-logits", "CE")) \
        + 0.4 * formulas[NEW_TOKEN_OUTPUT_LOSS]
    torch.testing.assert_close(out["loss"], 2 * before_auto, rtol=1e-5, atol=0)  # CE-auto-weighted adds CE scaled to what came before


def test_trained_output_rows_get_their_own_ce_unless_a_loss_trains_them(tiny_model_dir):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=False), losses=["MSE-on-hiddens"], train_output=True)
    batch = collate(examples)
    out = distiller(batch)
    torch.testing.assert_close(out["CE-output-rows"], _formulas(distiller, batch)["CE"])
    torch.testing.assert_close(out["loss"], out["MSE-on-hiddens"] + out["CE-output-rows"])
    distiller.losses = ("MSE-on-hiddens", NEW_TOKEN_OUTPUT_LOSS)
    assert "CE-output-rows" not in distiller(batch)
