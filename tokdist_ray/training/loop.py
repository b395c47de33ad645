"""The training loop, one for every strategy (strategies.Local, DataParallel, DeepSpeedZero):
the API runs it in process, each Ray Train worker runs it on its slice of every global
batch (worker.py). Same schedule, stop rule, progress meter and throughput count in both.

Each rank's loss is weighted by its share of the global batch's loss positions before the
strategy averages gradients, so a step on N workers equals the single-process step on the
whole global batch.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol, Sequence

import numpy as np
import pyarrow as pa
import torch

from tokdist_ray.config import DistillationConfig
from tokdist_ray.errors import TooFewSnippetsError
from tokdist_ray.training.batching import align_snippets, collate
from tokdist_ray.training.checkpoint import Progress, check_finite
from tokdist_ray.training.progress import ProgressMeter, TrainingHistory
from tokdist_ray.training.schedule import SnippetSchedule, make_optimizer
from tokdist_ray.training.step import TokenDistiller
from tokdist_ray.vocab.alignment import PieceAligner

Rows = dict[str, torch.Tensor]


class TrainingSnippets(Protocol):
    """What the loop reads: every snippet's student ids (for the schedule), the aligned
    examples of a batch and its token count."""

    student_ids: Sequence[Sequence[int]] | pa.ListArray

    def examples(self, indices: Sequence[int]) -> list[dict]: ...

    def tokens(self, indices: Sequence[int]) -> int: ...


class AlignedExamples:
    """Snippets aligned up front (the API's few thousand)."""

    def __init__(self, examples: Sequence[dict]):
        self._examples = examples
        self.student_ids = [e["student_ids"] for e in examples]

    def examples(self, indices: Sequence[int]) -> list[dict]:
        return [self._examples[i] for i in indices]

    def tokens(self, indices: Sequence[int]) -> int:
        return sum(len(self.student_ids[i]) for i in indices)


class SnippetIds:
    """Snippets as one Arrow list array, taken and aligned per batch (a worker's: millions
    of snippets as Python lists, or aligned up front, would cost gigabytes)."""

    def __init__(self, student_ids: pa.ListArray, aligner: PieceAligner):
        self.student_ids, self._aligner = student_ids, aligner
        self._lengths = np.diff(student_ids.offsets.to_numpy())

    def examples(self, indices: Sequence[int]) -> list[dict]:
        return align_snippets(self._aligner, self.student_ids.take(pa.array(indices, pa.int64())).to_pylist())

    def tokens(self, indices: Sequence[int]) -> int:
        return int(self._lengths[list(indices)].sum())


def train_loop(
    parallel,
    snippets: TrainingSnippets,
    schedule: SnippetSchedule,
    cfg: DistillationConfig,
    progress: Progress | None = None,
    *,
    rank: int = 0,
    world: int = 1,
    checkpoint_every: int = 0,
    checkpoint_every_s: float | None = None,
    save_checkpoint: Callable[[Progress, Rows, dict, bool], None] | None = None,
    after_step: Callable[[int, int], None] | None = None,
) -> tuple[Progress, Rows | None]:
    """Train from `progress` (a fresh start when None) until the schedule or the time
    budget stops it; returns (progress, the final fp32 rows; None when a restored run had
    no steps left). `cfg` is the run's global config (batch_size = the global batch).
    `save_checkpoint(progress, rows, metrics, last)` runs every `checkpoint_every` steps,
    once `checkpoint_every_s` seconds passed since the last checkpoint, and at the end, on
    every rank (a collective under ZeRO-3: the ranks agree on when)."""
    progress = progress or Progress()
    steps = schedule.total_steps(cfg)
    meter = ProgressMeter(steps, cfg.time_budget_s, reduce=parallel.all_reduce, prints=rank == 0)
    last_checkpoint = time.perf_counter()
    started = time.perf_counter() - progress.history.seconds
    rows = None
    # a run the budget stopped takes no further step when continued (for its fit, say),
    # unless the budget was raised: every rank restored the same seconds
    while progress.step < steps and not _budget_spent(cfg, progress.history):
        indices = schedule.rank_indices(progress.step, rank, world)
        global_batch = schedule.global_indices(progress.step)
        # a rank without snippets in a short batch still joins the gradient average,
        # with a zero-weighted loss on a borrowed snippet
        batch = collate(snippets.examples(indices or global_batch[:1]))
        metrics = _step(parallel, batch, world, has_snippets=bool(indices))
        history = progress.history
        progress.step = history.steps = progress.step + 1
        history.snippets += len(global_batch)
        history.seconds = time.perf_counter() - started
        meter.add(metrics, len(global_batch), snippets.tokens(global_batch))
        over_budget = checkpoint_due = False
        if cfg.time_budget_s or checkpoint_every_s:  # the same on every rank: all or none reduce
            over_budget, checkpoint_due = _any_rank(
                parallel, _budget_spent(cfg, history),
                bool(checkpoint_every_s) and time.perf_counter() - last_checkpoint >= checkpoint_every_s)
        stop = schedule.stop_reason(progress.step, cfg, over_budget)
        history.stopped_by = stop or history.stopped_by
        if after_step is not None:
            after_step(progress.step, rank)

        at_step = checkpoint_due or (checkpoint_every and progress.step % checkpoint_every == 0)
        at_checkpoint = stop or (save_checkpoint is not None and at_step)
        if at_checkpoint or progress.step % max(1, cfg.log_every) == 0:
            report = meter.flush(progress.step, schedule.position(progress.step - 1)[0], history)
        if at_checkpoint:
            rows = parallel.full_rows()
            check_finite(rows, progress.step)
            if save_checkpoint is not None:
                save_checkpoint(progress, rows, report, bool(stop))
                last_checkpoint = time.perf_counter()
        if stop:
            break
    return progress, rows


def _step(parallel, batch: dict, world: int, has_snippets: bool) -> dict[str, torch.Tensor]:
    """One optimizer step. The loss is a mean over loss positions, so this rank's loss is
    weighted by its share of the global batch's positions (x world, which the gradient
    average divides out)."""
    device = parallel.device
    positions = batch["student_mask"].sum().to(device, torch.float64) if has_snippets else torch.zeros((), dtype=torch.float64, device=device)
    total = positions.clone()
    parallel.all_reduce(total)
    share = (positions / total).float()
    metrics = parallel(batch)
    parallel.backward_and_step(metrics["loss"] * share * world)
    return {name: value.detach().float() * share for name, value in metrics.items()}


def _budget_spent(cfg: DistillationConfig, history) -> bool:
    return bool(cfg.time_budget_s) and history.seconds >= cfg.time_budget_s


def _any_rank(parallel, *flags: bool) -> list[bool]:
    """Each flag, true if it is true on any rank (one all-reduce for all of them)."""
    values = torch.tensor([float(f) for f in flags], device=parallel.device)
    parallel.all_reduce(values)
    return [bool(v) for v in values.tolist()]


def train_local(distiller: TokenDistiller, examples: Sequence[dict], cfg: DistillationConfig) -> TrainingHistory:
    """Train the new rows in this process (strategies.Local) on aligned examples: seeded
    shuffles, constant or linear LR, stopping at the end of the epochs, at max_steps or
    at the time budget."""
    from tokdist_ray.training.strategies import Local

    if not examples:
        raise TooFewSnippetsError("no training snippets: every new token was skipped for lack of snippets")
    torch.manual_seed(cfg.seed)
    snippets = AlignedExamples(examples)
    schedule = SnippetSchedule.for_run(snippets.student_ids, distiller.new_start, cfg)
    optimizer, lr_schedule = make_optimizer([p for p in distiller.parameters() if p.requires_grad], cfg,
                                            schedule.total_steps(cfg))
    progress, _ = train_loop(Local(distiller, optimizer, lr_schedule), snippets, schedule, cfg)
    return progress.history
