"""The distillation losses, in one registry (`LOSSES`).

Each loss declares the states it reads (`needs`), and only those are computed: the teacher
and the student stop at the target layer unless a loss reads final states, the teacher
does not run unless a loss compares against it, and the LM head runs over whole sequences
only for a loss that reads logits. Memory planning (strategies.memory_need) and config
validation read the same registry.

To add a loss: write its class here, add it to LOSSES (above CE-auto-weighted), and test
it in tests/unit/test_losses.py (its formula in `_formulas`).

No torch at import: the job and the API check loss names against LOSSES (check_methods)
before any heavy import, so the computations import torch where they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from tokdist_ray.config import NEW_TOKEN_OUTPUT_LOSS
from tokdist_ray.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from tokdist_ray.training.step import RunStates, TokenDistiller

TARGET = "target"  # hidden states at the target layer
FINAL = "final"  # hidden states after the last layer (and its norm)
LOGITS = "logits"  # the LM head at every position: [tokens, vocabulary] fp32, the largest activation of a step


@dataclass
class States:
    """What one step ran, as the losses read it: the batch on the device, and the student's
    and teacher's states (each None where no chosen loss reads it)."""

    distiller: TokenDistiller
    student_ids: torch.Tensor
    mask: torch.Tensor  # the student's non-pad positions
    teacher_ids: torch.Tensor
    index: torch.Tensor  # the teacher position aligned to each student position
    student: RunStates
    teacher: RunStates | None
    shared: dict = field(default_factory=dict)  # what several losses read, computed once

    def aligned(self, teacher_states: torch.Tensor) -> torch.Tensor:
        """The teacher's states at the positions aligned to the student's non-pad ones: the
        last subtoken of a merged phrase, and every unmerged token."""
        picked = teacher_states.gather(1, self.index[..., None].expand(-1, -1, teacher_states.size(-1)))
        return picked[self.mask]

    def once(self, key: str, compute: Callable[[], object]):
        """`compute()`, shared by every loss that asks for `key` in this step: one graph
        node, so the backward pass is the same however many losses read it."""
        if key not in self.shared:
            self.shared[key] = compute()
        return self.shared[key]

    def logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) fp32 logits over the original vocabulary at the aligned positions."""
        import torch

        def both():
            student = self.distiller.original_logits(self.student.final[self.mask])
            with torch.no_grad():
                return student, self.distiller.original_logits(self.aligned(self.teacher.final))

        return self.once(LOGITS, both)

    def next_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([batch, seq-1] positions followed by a non-pad token, the ids that follow them)."""
        positions = self.mask[:, 1:]
        return positions, self.student_ids[:, 1:][positions]


class Loss:
    """One term of the distillation loss: a name as in DistillationConfig.loss_methods,
    the states it reads, how it is computed and how it joins the total."""

    name: str
    needs: frozenset[str]
    reads_teacher = True  # False: it reads only the student; the teacher need not run for it
    trains_output_rows = False  # True: it trains an untied model's output rows, so they need no CE of their own

    @property
    def part(self) -> str:
        """The key of its value in TokenDistiller.forward's result."""
        return self.name

    def compute(self, states: States) -> torch.Tensor:
        raise NotImplementedError

    def weighted(self, value: torch.Tensor, total: torch.Tensor, states: States) -> torch.Tensor:
        """What it adds to `total`, the sum of the terms before it."""
        return value


class HiddenMSE(Loss):
    """MSE between the student's states at the target layer and the teacher's aligned ones."""

    name, needs = "MSE-on-hiddens", frozenset({TARGET})

    def compute(self, states: States) -> torch.Tensor:
        from torch.nn.functional import mse_loss

        return mse_loss(states.student.target[states.mask].float(), states.aligned(states.teacher.target).float())


class LogitMSE(Loss):
    """MSE between the student's and the teacher's logits at the aligned positions."""

    name, needs = "MSE-on-logits", frozenset({FINAL, LOGITS})

    def compute(self, states: States) -> torch.Tensor:
        from torch.nn.functional import mse_loss

        return mse_loss(*states.logits())


class LogitKL(Loss):
    """KL(teacher || student) of the next-token distributions, averaged over positions."""

    name, needs = "KL-on-logits", frozenset({FINAL, LOGITS})

    def compute(self, states: States) -> torch.Tensor:
        from torch.nn.functional import kl_div, log_softmax

        student, teacher = states.logits()
        return kl_div(log_softmax(student, -1), log_softmax(teacher, -1), reduction="batchmean", log_target=True)


class NewTokenOutputKL(Loss):
    """tokdist-ray's addition to the reference's losses: the student's next-token
    distribution before each new token, against the teacher's with the phrase's probability
    moved onto it (output_side.py). Its LM head runs only at those positions, so it does not
    read LOGITS; its sum over them is averaged over all student positions, like the MSE."""

    name, needs = NEW_TOKEN_OUTPUT_LOSS, frozenset({FINAL})
    trains_output_rows = True

    def compute(self, states: States) -> torch.Tensor:
        from tokdist_ray.training import output_side

        d, s_final = states.distiller, states.student.final
        at = output_side.new_token_positions(states.student_ids, states.mask, states.teacher_ids, states.index,
                                             d.new_start)
        targets = output_side.teacher_targets(at, states.teacher.final, d.original_logits, len(d.rows.input))
        out_rows = d.rows.input if d.tied else d.rows.output
        summed = output_side.summed_kl(targets, d.full_logits(s_final[at.batch, at.student], out_rows))
        if d.new_token_output_positions == "all":
            before_old = output_side.before_old_tokens(states.student_ids, states.mask, d.new_start)
            summed = summed + output_side.leaked_kl(s_final[:, :-1][before_old].detach(), out_rows, d.original_logits)
        return summed / states.mask.sum()

    def weighted(self, value, total, states):
        return states.distiller.new_token_output_weight * value


class CE(Loss):
    """The student's own next-token cross-entropy over the expanded vocabulary."""

    name, needs = "CE", frozenset({FINAL, LOGITS})
    reads_teacher = False

    def compute(self, states: States) -> torch.Tensor:
        return states.once("CE", lambda: self.student_ce(states))

    @staticmethod
    def student_ce(states: States) -> torch.Tensor:
        from torch.nn.functional import cross_entropy

        d = states.distiller
        positions, targets = states.next_tokens()
        # an untied model's output rows learn only from their own CE term (OutputRowsCE)
        out_rows = d.rows.input if d.tied else d.rows.output.detach()
        return cross_entropy(d.full_logits(states.student.final[:, :-1][positions], out_rows), targets)


class CEAutoWeighted(CE):
    """CE scaled to the size of the terms before it (so CE-auto-weighted must come after
    every loss it is to be weighed against)."""

    name = "CE-auto-weighted"
    part = "CE"  # the same value as CE's, computed once when both are chosen

    def weighted(self, value, total, states):
        return value * (total.detach() / value.detach().clamp_min(1e-12))


class OutputRowsCE(Loss):
    """Not a choosable loss: the CE that trains an untied model's output rows when no chosen
    loss does. Its hidden states are detached, so it reaches only those rows."""

    name, needs = "CE-output-rows", frozenset({FINAL, LOGITS})
    reads_teacher = False

    def compute(self, states: States) -> torch.Tensor:
        from torch.nn.functional import cross_entropy

        positions, targets = states.next_tokens()
        hidden = states.student.final[:, :-1][positions].detach()
        return cross_entropy(states.distiller.full_logits(hidden, states.distiller.rows.output), targets)


# The order is the order the terms are summed in: part of the result, bit for bit.
LOSSES: dict[str, Loss] = {loss.name: loss for loss in (
    HiddenMSE(),
    LogitMSE(),
    LogitKL(),
    NewTokenOutputKL(),
    CE(),
    CEAutoWeighted(),  # last: it scales CE to the terms above it
)}


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """`methods` (DistillationConfig.loss_methods) if every name is registered and they combine."""
    unknown = [m for m in methods if m not in LOSSES]
    if unknown or not methods:
        raise ConfigError(f"unknown loss method(s) {unknown or '(none given)'}; choose from {tuple(LOSSES)}")
    others = tuple(m for m in LOSSES if m not in ("CE", "CE-auto-weighted"))
    if "CE-auto-weighted" in methods and not set(methods) & set(others):
        raise ConfigError(f"CE-auto-weighted scales CE to another loss: combine it with one of {others}")
    return tuple(methods)


def needed(names: Iterable[str]) -> frozenset[str]:
    """The states the named losses read, together."""
    return frozenset().union(*(LOSSES[name].needs for name in names))


def depths(terms: Iterable[Loss], of_teacher: bool) -> tuple[bool, bool]:
    """(target, final): which of the student's (or the teacher's) hidden states `terms` read."""
    needs = frozenset().union(*(t.needs for t in terms if t.reads_teacher or not of_teacher))
    return TARGET in needs, bool({FINAL, LOGITS} & needs)  # logits are read from final states
