"""What happens at each step of a run, the same for the local loop and every Ray worker:
the optimizer and its learning-rate schedule, the seeded snippet order, the number of
steps, and why training stops.

Global batch k of an epoch is `order[k*G:(k+1)*G]` of that epoch's seeded shuffle, so the
data position is the step number alone: a resumed run continues at the exact snippet
where its checkpoint left off, and G split over ranks gives the same batches as one
process with batch G.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

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


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The snippet order of one epoch: a seeded shuffle, the same on every worker."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


@lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(epoch_order(n, seed, epoch))


@dataclass(frozen=True)
class SnippetSchedule:
    """Maps a global step to the snippets of the global batch and of each rank, and says
    how many steps a run takes and when it stops."""

    n_snippets: int
    global_batch: int
    seed: int

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

    def global_indices(self, step: int) -> list[int]:
        epoch, batch = self.position(step)
        order = _epoch_order(self.n_snippets, self.seed, epoch)
        return list(order[batch * self.global_batch : (batch + 1) * self.global_batch])

    def rank_indices(self, step: int, rank: int, world: int) -> list[int]:
        """This rank's contiguous slice of the global batch; slices differ in size by at
        most one, and a rank gets none when a short last batch has fewer snippets than ranks."""
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
