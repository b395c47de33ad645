"""The single-process training loop (the Python API's), on the same schedule, stop rule
and progress meter as the Ray workers."""

from __future__ import annotations

import time
from typing import Sequence

import torch

from tokdist_ray.config import DistillationConfig
from tokdist_ray.errors import TooFewSnippetsError
from tokdist_ray.training.batching import collate
from tokdist_ray.training.progress import ProgressMeter, TrainingHistory
from tokdist_ray.training.schedule import SnippetSchedule, make_optimizer
from tokdist_ray.training.step import TokenDistiller


def train_local(distiller: TokenDistiller, examples: Sequence[dict], cfg: DistillationConfig) -> TrainingHistory:
    """Train the new rows in this process: seeded shuffles, constant or linear LR,
    stopping at the end of the epochs, at max_steps or at the time budget."""
    if not examples:
        raise TooFewSnippetsError("no training snippets: every new token was skipped for lack of snippets")
    torch.manual_seed(cfg.seed)
    schedule = SnippetSchedule.for_run([e["student_ids"] for e in examples], distiller.new_start, cfg)
    steps = schedule.total_steps(cfg)
    optimizer, lr_schedule = make_optimizer([p for p in distiller.parameters() if p.requires_grad], cfg, steps)
    history, meter = TrainingHistory(), ProgressMeter(steps, cfg.time_budget_s)
    start = time.perf_counter()  # the frozen model stays in eval mode: no dropout
    while True:
        batch = [examples[i] for i in schedule.global_indices(history.steps)]
        metrics = distiller(collate(batch))
        metrics["loss"].backward()
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.steps += 1
        history.snippets += len(batch)
        history.seconds = time.perf_counter() - start
        meter.add(metrics, len(batch), sum(len(e["teacher_ids"]) for e in batch))
        stop = schedule.stop_reason(history.steps, cfg, bool(cfg.time_budget_s) and history.seconds >= cfg.time_budget_s)
        if stop or history.steps % max(1, cfg.log_every) == 0:
            meter.flush(history.steps, schedule.position(history.steps - 1)[0], history)
        if stop:
            history.stopped_by = stop
            return history
