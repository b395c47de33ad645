"""Output-side distillation (KL-on-new-token-outputs): targets, loss, what it trains."""

import pytest
import torch

from tests.helpers import tiny_setup
from tokdist_ray.config import NEW_TOKEN_OUTPUT_LOSS, DistillationConfig
from tokdist_ray.training.batching import collate
from tokdist_ray.training.loop import train_local
from tokdist_ray.training.output_side import new_token_positions, phrase_targets, summed_kl


def _student_final_states(distiller, batch):
    ids = batch["student_ids"]
    embeds = distiller.model.get_input_embeddings()(ids.clamp(max=distiller.new_start - 1)).clone()
    new = ids >= distiller.new_start
    embeds[new] = distiller.rows.input[ids[new] - distiller.new_start]
    return distiller.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]


def _output_rows(distiller):
    rows = distiller.rows.input if distiller.rows.output is None else distiller.rows.output
    return torch.cat([distiller.model.get_output_embeddings().weight[: distiller.new_start], rows])


def _manual_loss(distiller, batch):
    """The loss the slow, obvious way: full model runs, one position at a time."""
    model, new_start = distiller.model, distiller.new_start
    n_new = len(distiller.rows.input)
    with torch.no_grad():
        teacher = model(batch["teacher_ids"]).logits[..., :new_start].log_softmax(-1)
        student = (_student_final_states(distiller, batch) @ _output_rows(distiller).T).log_softmax(-1)
    ids, t_ids, index, mask = batch["student_ids"], batch["teacher_ids"], batch["teacher_index"], batch["student_mask"]
    kls = []
    for b in range(len(ids)):
        for j in range(ids.shape[1] - 1):
            if not (mask[b, j] and mask[b, j + 1] and ids[b, j + 1] >= new_start):
                continue
            t0, t1 = int(index[b, j]), int(index[b, j + 1])
            phrase = sum(teacher[b, t, t_ids[b, t + 1]] for t in range(t0, t1)).exp()
            target = torch.cat([teacher[b, t0].exp(), torch.zeros(n_new)])
            target[t_ids[b, t0 + 1]] -= phrase
            target[ids[b, j + 1]] = phrase
            kls.append((target * (target.clamp_min(1e-30).log() - student[b, j])).sum())
    assert len(kls) >= 4  # every snippet holds a new token
    return torch.stack(kls).sum() / mask.sum()


def test_loss_is_zero_when_the_student_matches_the_adjusted_teacher():
    torch.manual_seed(0)
    first_log_probs = torch.randn(3, 50).mul(3).log_softmax(-1)
    first_piece = first_log_probs.argmax(-1)  # a likely first piece, so its phrase has real mass
    phrase_log_prob = first_log_probs.max(-1).values + torch.tensor([-0.1, -1.0, -5.0])
    targets = phrase_targets(first_log_probs, phrase_log_prob, first_piece, torch.tensor([0, 2, 2]), 4)
    torch.testing.assert_close(targets.sum(-1), torch.ones(3))
    torch.testing.assert_close(targets[:, 50:][[0, 1, 2], [0, 2, 2]], phrase_log_prob.exp())
    assert (targets[:, 50:] > 0).sum() == 3
    rows = torch.arange(3)
    torch.testing.assert_close(targets[rows, first_piece], first_log_probs.exp()[rows, first_piece] - phrase_log_prob.exp())

    assert summed_kl(targets, targets.clamp_min(1e-30).log()).abs() < 1e-6
    assert summed_kl(targets, torch.zeros_like(targets)) > 0.1


def test_a_batch_without_new_tokens_gives_zero_loss_with_a_gradient():
    at = new_token_positions(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool), torch.tensor([[1, 2, 3]]),
                             torch.tensor([[0, 1, 2]]), new_start=10)
    assert len(at.batch) == 0
    logits = torch.zeros(0, 12, requires_grad=True)
    loss = summed_kl(torch.zeros(0, 12), logits)
    loss.backward()
    assert loss == 0


@pytest.mark.parametrize("tied", [True, False])
def test_loss_matches_a_full_model_computation(tiny_model_dir, tied):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=tied), losses=["MSE-on-hiddens", NEW_TOKEN_OUTPUT_LOSS])
    batch = collate(examples)
    out = distiller(batch)
    torch.testing.assert_close(out[NEW_TOKEN_OUTPUT_LOSS], _manual_loss(distiller, batch))
    torch.testing.assert_close(out["loss"], out["MSE-on-hiddens"] + out[NEW_TOKEN_OUTPUT_LOSS])
    assert "CE-output-rows" not in out  # the teacher, not the data's CE, trains an untied model's output rows


def test_a_new_token_learns_the_probability_the_teacher_gives_its_phrase(tiny_model_dir):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=False), losses=[NEW_TOKEN_OUTPUT_LOSS])
    example = examples[2]  # one new token in it: the student's prefix equals the teacher's
    batch = collate([example])
    at = new_token_positions(batch["student_ids"], batch["student_mask"], batch["teacher_ids"], batch["teacher_index"],
                             distiller.new_start)
    assert len(at.batch) == 1
    model = distiller.model
    with torch.no_grad():  # make the random teacher predict the phrase's pieces, so its probability is far from 0
        hidden = model(batch["teacher_ids"], output_hidden_states=True).hidden_states[-1][0]
        for t, piece in zip(at.teacher[0][at.valid[0]], at.pieces[0][at.valid[0]]):
            model.lm_head.weight[piece] += 8 * hidden[t] / hidden[t].norm() ** 2
        teacher = model(batch["teacher_ids"]).logits[0].log_softmax(-1)
        phrase = teacher[at.teacher[0][at.valid[0]], at.pieces[0][at.valid[0]]].sum().exp()
    assert 0.05 < phrase < 0.95


    @torch.no_grad()
    def student_probability():
        hidden = _student_final_states(distiller, batch)[0, int(at.student[0])]
        return (hidden @ _output_rows(distiller).T).softmax(-1)[distiller.new_start + int(at.new_index[0])]

    assert student_probability() < phrase / 10
    train_local(distiller, [example], DistillationConfig(epochs=80, learning_rate=3e-2, lr_schedule="linear", log_every=10**6))
    torch.testing.assert_close(student_probability(), phrase, atol=0.02, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_training_moves_the_new_rows_and_leaves_the_model_bit_identical(tiny_model_dir, tied):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=tied), losses=["MSE-on-hiddens", NEW_TOKEN_OUTPUT_LOSS])
    trained = distiller.rows.input if tied else distiller.rows.output
    rows_before = trained.detach().clone()
    weights_before = {k: v.clone() for k, v in distiller.model.state_dict().items()}
    before = distiller(collate(examples))[NEW_TOKEN_OUTPUT_LOSS]
    train_local(distiller, examples, DistillationConfig(epochs=20, batch_size=2, learning_rate=1e-2, log_every=1000))
    after = distiller(collate(examples))[NEW_TOKEN_OUTPUT_LOSS]
    assert after < 0.5 * before
    assert not torch.equal(rows_before, trained.detach())
    for name, weight in distiller.model.state_dict().items():
        assert torch.equal(weight, weights_before[name]), name


def test_the_weight_scales_the_output_side_loss_against_the_hidden_state_loss(tiny_model_dir):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=True), losses=["MSE-on-hiddens", NEW_TOKEN_OUTPUT_LOSS])
    batch = collate(examples)
    out = distiller(batch)
    distiller.new_token_output_weight = 0.4
    weighted = distiller(batch)
    assert out[NEW_TOKEN_OUTPUT_LOSS] > 0
    torch.testing.assert_close(weighted["loss"], out["MSE-on-hiddens"] + 0.4 * out[NEW_TOKEN_OUTPUT_LOSS])
    torch.testing.assert_close(out["loss"], out["MSE-on-hiddens"] + out[NEW_TOKEN_OUTPUT_LOSS])
    with pytest.raises(ValueError, match="new_token_output_weight must be a finite number > 0"):
        DistillationConfig(new_token_output_weight=0)


@pytest.mark.parametrize("tied", [True, False])
def test_all_positions_add_the_mass_leaked_onto_new_tokens_before_old_ones(tiny_model_dir, tied):
    distiller, examples, _ = tiny_setup(tiny_model_dir(tied=tied), losses=["MSE-on-hiddens", NEW_TOKEN_OUTPUT_LOSS])
    batch = collate(examples)
    at_new = distiller(batch)[NEW_TOKEN_OUTPUT_LOSS]
    distiller.new_token_output_positions = "all"
    at_all = distiller(batch)[NEW_TOKEN_OUTPUT_LOSS]
    with torch.no_grad():  # the slow way: -log of the student's mass on old tokens, before each old token
        student = (_student_final_states(distiller, batch) @ _output_rows(distiller).T).softmax(-1)
        ids, mask = batch["student_ids"], batch["student_mask"]
        before_old = mask[:, :-1] & mask[:, 1:] & (ids[:, 1:] < distiller.new_start)
        leaked = -student[:, :-1][before_old][:, : distiller.new_start].sum(-1).log().sum() / mask.sum()
    assert leaked > 0
    torch.testing.assert_close(at_all - at_new, leaked)

    def grads(positions):
        distiller.new_token_output_positions = positions
        distiller.rows.zero_grad()
        distiller(batch)["loss"].backward()
        return [p.grad.clone() for p in (distiller.rows.input, distiller.rows.output) if p is not None]

    extra = [a - b for a, b in zip(grads("all"), grads("new_tokens"))]
    assert extra[-1].abs().sum() > 0  # the leak trains the new output rows...
    if not tied:  # ...and only them: the states it reads are detached
        torch.testing.assert_close(extra[0], torch.zeros_like(extra[0]))
