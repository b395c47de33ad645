"""Training progress: the history report.json shows, and one meter that prints a line
per interval (loss, snippets/s, tokens/s, elapsed, ETA) for the local loop and for the
Ray workers alike."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tokdist_ray.training.schedule import eta_seconds

log = logging.getLogger("tokdist_ray")


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
            "prefix_skipped": self.prefix_skipped(),
            "stopped_by": self.stopped_by,
            "loss_curve": self.loss_curve,
        }

    def prefix_skipped(self) -> float | None:
        """The share of student positions the teacher's prefix spared, over the run."""
        weighted = steps = previous = 0
        for point in self.loss_curve:
            if "prefix_skipped" in point:
                weighted += point["prefix_skipped"] * (point["step"] - previous)
                steps += point["step"] - previous
            previous = point["step"]
        return round(weighted / steps, 4) if steps else None


class ProgressMeter:
    """Sums step metrics over an interval; `flush` turns them into one point of the loss
    curve and one progress line. `reduce` combines the sums over workers (an all-reduce;
    each worker's metrics are already weighted by its share of the global batch)."""

    def __init__(self, total_steps: int, budget_s: float | None, reduce: Callable[[torch.Tensor], None] | None = None,
                 prints: bool = True):
        self.total, self.budget_s, self.reduce, self.prints = total_steps, budget_s, reduce, prints
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = self.snippets = self.tokens = 0
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], snippets: int, tokens: int) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
        self.steps += 1
        self.snippets += snippets
        self.tokens += tokens

    def flush(self, step: int, epoch: int, history: TrainingHistory) -> dict:
        """Append the interval's mean metrics to the loss curve; returns the full report."""
        names = sorted(self.sums)
        totals = torch.stack([self.sums[n] for n in names])
        if self.reduce is not None:
            self.reduce(totals)
        losses = {n: float(v) / self.steps for n, v in zip(names, totals.cpu())}
        seconds = max(time.perf_counter() - self.start, 1e-9)
        point = {"step": step, "epoch": epoch, **losses}
        history.loss_curve.append(point)
        report = {
            **point,
            "snippets_per_s": self.snippets / seconds,
            "tokens_per_s": self.tokens / seconds,
            "elapsed_s": history.seconds,
            "eta_s": eta_seconds(seconds / self.steps, self.total - step, self.budget_s, history.seconds),
        }
        if self.prints:
            log.info(
                "step %d/%d epoch %d loss %.5f | %.1f snippets/s %.0f tokens/s, %.0f%% from the teacher's prefix"
                " | elapsed %.0fs eta %.0fs",
                step, self.total, epoch, losses["loss"], report["snippets_per_s"], report["tokens_per_s"],
                100 * losses.get("prefix_skipped", 0.0), report["elapsed_s"], report["eta_s"],
            )
        self._reset()
        return report
