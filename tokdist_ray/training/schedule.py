"""What happens at each step of a run, the same for the local loop and every Ray worker:
the optimizer and its learning-rate schedule, the seeded snippet order, the number of
steps, and why training stops.

Global batch k of an epoch is the k-th of that epoch's seeded batches, so the data
position is the step number alone: a resumed run continues at the exact snippet where its
checkpoint left off, and G split over ranks gives the same batches as one process with
batch G. Random batches are `order[k*G:(k+1)*G]` of a seeded shuffle; grouped batches
(`batch_grouping="first_new_token"`) hold snippets whose first new token sits at similar
positions, so the student reuses a long prefix of the teacher's states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from tokdist_ray.config import DistillationConfig


def make_optimizer(params, cfg: DistillationConfig, total_steps: int):
    """AdamW without weight decay (as in the reference) over the new rows only, and the
    configured schedule: constant, or linear warmup then linear decay to zero."""
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if cfg.lr_schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The snippet order of one epoch: a seeded shuffle, the same on every worker."""
    return torch.randperm(n, generator=_generator(seed, epoch)).tolist()


def first_new_positions(snippets: Sequence[Sequence[int]] | pa.ListArray, new_start: int) -> list[int]:
    """Each snippet's position of its first new id (its length when it holds none): the
    student's states before it are the teacher's. Snippets as lists, or as one Arrow
    list array (a worker's: counted in numpy, no Python object per id)."""
    if not isinstance(snippets, pa.ListArray):
        return [next((i for i, t in enumerate(ids) if t >= new_start), len(ids)) for ids in snippets]
    offsets, values = snippets.offsets.to_numpy(), snippets.values.to_numpy()
    first = np.diff(offsets)
    new = np.flatnonzero(values >= new_start)
    new = new[(new >= offsets[0]) & (new < offsets[-1])]
    owners = np.searchsorted(offsets, new, side="right") - 1
    holding, earliest = np.unique(owners, return_index=True)  # `new` is sorted: the first of each owner
    first[holding] = new[earliest] - offsets[holding]
    return first.tolist()


def grouped_epoch_batches(first_new: Sequence[int], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches of snippets whose first new token sits at similar positions:
    snippets sorted by that position (in a fresh random order among equal positions), cut
    into global batches, and the batches shuffled. Seeded like `epoch_order`."""
    g = _generator(seed, epoch)
    shuffled = torch.randperm(len(first_new), generator=g)
    by_position = torch.sort(torch.as_tensor(first_new)[shuffled], stable=True).indices
    ordered = shuffled[by_position].tolist()
    batches = [ordered[i : i + global_batch] for i in range(0, len(ordered), global_batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


@dataclass(frozen=True)
class SnippetSchedule:
    """Maps a global step to the snippets of the global batch and of each rank, and says
    how many steps a run takes and when it stops."""

    n_snippets: int
    global_batch: int
    seed: int
    # each snippet's first new-token position to group batches by; None: random batches
    first_new: tuple[int, ...] | None = field(default=None, repr=False)
    _batches: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # the current epoch's

    @classmethod
    def for_run(cls, student_ids: Sequence[Sequence[int]], new_start: int, cfg: DistillationConfig) -> "SnippetSchedule":
        """The schedule of a run over these snippets with global batch `cfg.batch_size`."""
        grouped = cfg.batch_grouping == "first_new_token"
        first_new = tuple(first_new_positions(student_ids, new_start)) if grouped else None
        return cls(len(student_ids), cfg.batch_size, cfg.seed, first_new)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_snippets / self.global_batch)

    def total_steps(self, cfg: DistillationConfig) -> int:
        """Steps of all epochs, cut at max_steps."""
        steps = cfg.epochs * self.batches_per_epoch
        return min(steps, cfg.max_steps) if cfg.max_steps else steps

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a 0-based step."""
        return divmod(step, self.batches_per_epoch)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._batches:
            self._batches.clear()
            if self.first_new is None:
                order = epoch_order(self.n_snippets, self.seed, epoch)
                batches = [order[i : i + self.global_batch] for i in range(0, self.n_snippets, self.global_batch)]
            else:
                batches = grouped_epoch_batches(self.first_new, self.global_batch, self.seed, epoch)
            self._batches[epoch] = batches
        return self._batches[epoch]

    def global_indices(self, step: int) -> list[int]:
        epoch, batch = self.position(step)
        return list(self.epoch_batches(epoch)[batch])

    def rank_indices(self, step: int, rank: int, world: int) -> list[int]:
        """This rank's contiguous slice of the global batch; slices differ in size by at
        most one, and a rank gets none when a short batch has fewer snippets than ranks."""
        batch = self.global_indices(step)
        size, extra = divmod(len(batch), world)
        start = rank * size + min(rank, extra)
        return list(batch[start : start + size + (rank < extra)])

    def stop_reason(self, steps_done: int, cfg: DistillationConfig, over_budget: bool) -> str | None:
        """Why training ends after this step, or None: "completed" (every epoch),
        "max_steps" or "time_budget"."""
        if steps_done >= self.total_steps(cfg):
            return "max_steps" if steps_done < cfg.epochs * self.batches_per_epoch else "completed"
        if over_budget:
            return "time_budget"
        return None


def eta_seconds(seconds_per_step: float, steps_left: int, budget_s: float | None, elapsed_s: float) -> float:
    """Time to the last step, or to the end of the time budget when that comes first."""
    eta = seconds_per_step * steps_left
    return eta if budget_s is None else max(0.0, min(eta, budget_s - elapsed_s))
