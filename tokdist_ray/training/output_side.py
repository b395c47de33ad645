"""Output-side distillation: the student predicts a new token as the teacher predicted its pieces.

At a student position j whose next token is a new id k, the teacher's probability of that
continuation is the product of its probabilities of k's pieces, read at the aligned teacher
positions teacher_index[j] .. teacher_index[j+1]-1. The target distribution at j is the
teacher's next-token distribution at teacher_index[j] with that phrase probability moved
from k's first piece to k; every other new id gets 0. The loss is KL(target || student),
summed here and averaged by the step over all student positions, like the hidden-state
MSE: this weighs the two per position, and the data-parallel step's weighting of ranks
by their share of positions stays exact.

Positions before an old token count 0 by default. With `positions="all"` they count the
mass the student leaks onto new tokens there: the teacher puts none on them, and the
student's old logits are the teacher's (they are computed by frozen rows), so the KL is
softplus(logsumexp(new logits) - log Z_old), whose gradient on a new output row is
exactly the full KL's. Without it nothing holds a new token's logit down where the token
does not come next, and the expanded model pays that mass at every other position.

Every LM-head product here is fp32 (`head_logits`), also from a bf16 model under autocast:
bf16 logits are 0.125 apart near 20, as coarse as the differences these targets carry.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

VOCAB_SLICE = 16_384  # logits held at once: [batch, positions, VOCAB_SLICE], not the whole vocabulary


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """hidden @ weight.T (+ bias) in fp32, whatever the dtypes and an enclosing autocast
    (which would compute it in bf16). From a bf16 model's states and rows the products are
    exact in fp32, so these are the exact logits up to fp32 summation."""
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())


class NewTokenPositions(NamedTuple):
    """Student positions followed by a new token, and the teacher positions that predict its pieces."""

    batch: torch.Tensor  # [P] row in the batch
    student: torch.Tensor  # [P] student position j
    new_index: torch.Tensor  # [P] k - new_start
    teacher: torch.Tensor  # [P, L] teacher positions predicting piece 1..L (padded by repeating the first)
    pieces: torch.Tensor  # [P, L] the piece each of them predicts
    valid: torch.Tensor  # [P, L] False past the phrase's length


def new_token_positions(
    student_ids: torch.Tensor, mask: torch.Tensor, teacher_ids: torch.Tensor, teacher_index: torch.Tensor, new_start: int
) -> NewTokenPositions:
    follows = mask[:, :-1] & mask[:, 1:] & (student_ids[:, 1:] >= new_start)
    batch, student = follows.nonzero(as_tuple=True)
    start = teacher_index[batch, student]
    length = teacher_index[batch, student + 1] - start
    offsets = torch.arange(int(length.max()) if len(length) else 1, device=student_ids.device)
    valid = offsets[None, :] < length[:, None]
    teacher = start[:, None] + offsets[None, :] * valid
    pieces = teacher_ids[batch[:, None], teacher + 1]
    return NewTokenPositions(batch, student, student_ids[batch, student + 1] - new_start, teacher, pieces, valid)


def phrase_targets(
    first_log_probs: torch.Tensor, phrase_log_prob: torch.Tensor, first_piece: torch.Tensor, new_index: torch.Tensor, n_new: int
) -> torch.Tensor:
    """[P, V + n_new] target distributions: the teacher's [P, V] next-token distribution
    with each phrase's probability moved from its first piece to its new id."""
    original = first_log_probs.exp()
    phrase = phrase_log_prob.exp()
    rows = torch.arange(len(original), device=original.device)
    original[rows, first_piece] = (original[rows, first_piece] - phrase).clamp_min(0)
    new = original.new_zeros(len(original), n_new)
    new[rows, new_index] = phrase
    return torch.cat([original, new], dim=-1)


def summed_kl(targets: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(student_logits)) summed over positions (0 when there are none)."""
    log_student = student_logits.float().log_softmax(-1)
    return (torch.xlogy(targets, targets) - targets * log_student).sum()


@torch.no_grad()
def teacher_targets(
    at: NewTokenPositions, teacher_final: torch.Tensor, original_logits: Callable[[torch.Tensor], torch.Tensor], n_new: int
) -> torch.Tensor:
    """Targets from the teacher's final states (`original_logits`: their fp32 logits); the LM
    head runs only at the positions that predict a piece, never over the whole [batch, seq, vocab]."""
    log_probs = original_logits(teacher_final[at.batch[:, None].expand_as(at.teacher)[at.valid], at.teacher[at.valid]])
    log_probs = log_probs.log_softmax(-1)
    piece_log_probs = torch.zeros(at.valid.shape, device=log_probs.device)
    piece_log_probs[at.valid] = log_probs.gather(1, at.pieces[at.valid][:, None]).squeeze(1)
    # the first valid row of each position is its offset 0: rows come out in [P, L] order
    firsts = at.valid.sum(1).cumsum(0) - at.valid.sum(1)
    return phrase_targets(log_probs[firsts], piece_log_probs.sum(1), at.pieces[:, 0], at.new_index, n_new)


POSITION_CHUNK = 512  # positions per [chunk, vocabulary] logits block when normalising


def before_old_tokens(student_ids: torch.Tensor, mask: torch.Tensor, new_start: int) -> torch.Tensor:
    """[batch, seq-1] True at student positions whose next token is an old one."""
    return mask[:, :-1] & mask[:, 1:] & (student_ids[:, 1:] < new_start)


def leaked_kl(
    hidden: torch.Tensor, new_rows: torch.Tensor, original_logits: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """KL summed over positions before an old token (`hidden`: their final states,
    detached; `original_logits`: their fp32 logits), where the target puts no mass on new
    tokens: it trains only `new_rows`."""
    with torch.no_grad():
        log_norm = torch.cat([torch.logsumexp(original_logits(h), -1)
                              for h in hidden.split(POSITION_CHUNK)]) if len(hidden) else hidden.new_zeros(0)
    new_log_norm = torch.logsumexp(head_logits(hidden, new_rows), -1)
    return torch.nn.functional.softplus(new_log_norm - log_norm).sum()
