"""The single-process training loop and the pieces the distributed loop shares with it:
optimizer, learning-rate schedule, seeded epoch order, progress and the loss curve."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from tokdist_ray.training.batching import collate
from tokdist_ray.config import DistillationConfig
from tokdist_ray.training.step import TokenDistiller

log = logging.getLogger("tokdist_ray")


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


def batches(examples: Sequence[dict], batch_size: int, order: Sequence[int]) -> Iterator[dict]:
    for i in range(0, len(order), batch_size):
        yield collate([examples[j] for j in order[i : i + batch_size]])


def total_steps(n_examples: int, cfg: DistillationConfig) -> int:
    steps = cfg.epochs * math.ceil(n_examples / cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


@dataclass
class TrainingHistory:
    """What report.json shows of training: the loss curve and the throughput."""

    steps: int = 0
    snippets: int = 0
    seconds: float = 0.0
    loss_curve: list[dict] = field(default_factory=list)  # {"step", "epoch", "loss", ...}
    stopped_by: str = "completed"  # or "max_steps" / "time_budget"

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "snippets": self.snippets,
            "seconds": round(self.seconds, 3),
            "snippets_per_second": round(self.snippets / self.seconds, 3) if self.seconds else None,
            "stopped_by": self.stopped_by,
            "loss_curve": self.loss_curve,
        }


def eta_seconds(seconds_per_step: float, steps_left: int, budget_s: float | None, elapsed_s: float) -> float:
    """Time to the last step, or to the end of the time budget when that comes first."""
    eta = seconds_per_step * steps_left
    return eta if budget_s is None else max(0.0, min(eta, budget_s - elapsed_s))


class ProgressLog:
    """Averages step metrics over a window and prints one line per window, with ETA."""

    def __init__(self, every: int, total: int, budget_s: float | None = None):
        self.every, self.total, self.budget_s = max(1, every), total, budget_s
        self.window: dict[str, list[float]] = {}
        self.start = time.perf_counter()

    def add(self, step: int, epoch: int, metrics: dict[str, torch.Tensor], history: TrainingHistory) -> None:
        for k, v in metrics.items():
            self.window.setdefault(k, []).append(float(v.detach()))
        if step % self.every and step != self.total:
            return
        point = {"step": step, "epoch": epoch, **{k: sum(v) / len(v) for k, v in self.window.items()}}
        history.loss_curve.append(point)
        elapsed = time.perf_counter() - self.start
        eta = eta_seconds(elapsed / step, self.total - step, self.budget_s, history.seconds)
        log.info(
            "step %d/%d epoch %d loss %.5f | %.1f snippets/s | elapsed %.0fs eta %.0fs",
            step, self.total, epoch, point["loss"], history.snippets / max(elapsed, 1e-9), elapsed, eta,
        )
        self.window = {}


def train_local(distiller: TokenDistiller, examples: Sequence[dict], cfg: DistillationConfig) -> TrainingHistory:
    """Train the new rows in this process: seeded shuffles, constant or linear LR,
    stopping at the end of the epochs, at max_steps or at the time budget."""
    if not examples:
        raise ValueError("no training snippets: every new token was skipped for lack of snippets")
    torch.manual_seed(cfg.seed)
    steps = total_steps(len(examples), cfg)
    optimizer, schedule = make_optimizer([p for p in distiller.parameters() if p.requires_grad], cfg, steps)
    history, progress = TrainingHistory(), ProgressLog(cfg.log_every, steps, cfg.time_budget_s)
    natural_steps = cfg.epochs * math.ceil(len(examples) / cfg.batch_size)
    start = time.perf_counter()  # the frozen model stays in eval mode: no dropout
    for epoch in range(cfg.epochs):
        for batch in batches(examples, cfg.batch_size, epoch_order(len(examples), cfg.seed, epoch)):
            metrics = distiller(batch)
            metrics["loss"].backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            history.steps += 1
            history.snippets += len(batch["student_ids"])
            progress.add(history.steps, epoch, metrics, history)
            history.seconds = time.perf_counter() - start
            if history.steps >= steps:
                history.stopped_by = "max_steps" if steps < natural_steps else "completed"
                return history
            if cfg.time_budget_s and history.seconds >= cfg.time_budget_s:
                history.stopped_by = "time_budget"
                return history
    return history
