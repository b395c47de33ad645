"""What a distributed run's checkpoint holds, and reading it back.

    checkpoint_step_00000040/          (one directory in the run's storage; Ray merges
      progress.json                     the files every worker wrote into it)
      new_rows.safetensors              the whole new rows, fp32 (rank 0)
      rng_rank{r}.pt                    RNG states of rank r
      optimizer/                        the strategy's own optimizer state (strategies.py)

The data position is the step: the snippet schedule (schedule.py) maps it to the exact
snippets that come next.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tokdist_ray.errors import TrainingDivergedError
from tokdist_ray.training.progress import TrainingHistory
from tokdist_ray.training.run_manifest import CHECKPOINT_PREFIX

PROGRESS = "progress.json"
ROWS = "new_rows.safetensors"
OPTIMIZER_DIR = "optimizer"


@dataclass
class Progress:
    """Where a run stands: steps done, the history so far, and the steps it was resumed at."""

    step: int = 0
    history: TrainingHistory = field(default_factory=TrainingHistory)
    resumed_from: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        h = self.history
        return {
            "step": self.step,
            "resumed_from": self.resumed_from,
            "history": {
                "steps": h.steps, "snippets": h.snippets, "seconds": h.seconds,
                "loss_curve": h.loss_curve, "stopped_by": h.stopped_by,
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Progress":
        return cls(step=d["step"], history=TrainingHistory(**d["history"]), resumed_from=list(d["resumed_from"]))


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def write_progress(directory: Path, progress: Progress) -> None:
    (directory / PROGRESS).write_text(json.dumps(progress.as_dict()), encoding="utf-8")


def read_progress(directory: Path) -> Progress:
    return Progress.from_dict(json.loads((directory / PROGRESS).read_text(encoding="utf-8")))


def write_checkpoint(directory: Path, parallel, progress: Progress, rows: dict[str, torch.Tensor], rank: int) -> None:
    """This rank's part of a checkpoint: its strategy's optimizer state and its RNG states;
    rank 0 adds the progress and the whole rows. A collective under ZeRO (every rank calls it)."""
    parallel.save(directory / OPTIMIZER_DIR, rank)
    save_rng(directory, rank)
    if rank == 0:
        write_progress(directory, progress)
        write_rows(directory / ROWS, rows)


def read_checkpoint(directory: Path, parallel, rank: int) -> tuple[Progress, dict[str, torch.Tensor]]:
    """(progress, rows) of a checkpoint, loaded into the strategy `parallel` with this rank's
    RNG states; the progress records the step it resumed at."""
    progress = read_progress(directory)
    rows = read_rows(directory / ROWS)
    parallel.load(directory / OPTIMIZER_DIR, rows)
    restore_rng(directory, rank)
    progress.resumed_from.append(progress.step)
    return progress, rows


def check_finite(rows: dict[str, torch.Tensor | None], step: int) -> None:
    """Before any checkpoint or export: a diverged run stops here and saves nothing broken."""
    for side, values in rows.items():
        if values is not None and not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).any(dim=-1).sum())
            raise TrainingDivergedError(
                f"training diverged: by step {step}, {bad} of {len(values)} new {side} rows hold inf or nan, so "
                "nothing was saved; lower training.learning_rate (or use lr_schedule linear with warmup) and run again"
            )


def write_rows(path: Path, rows: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().float().cpu().contiguous() for k, v in rows.items()}, str(path))


def read_rows(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_rng(directory: Path, rank: int) -> None:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, directory / f"rng_rank{rank}.pt")


def restore_rng(directory: Path, rank: int) -> None:
    """Restore this rank's RNG states; a rank the checkpoint did not have keeps its own."""
    path = directory / f"rng_rank{rank}.pt"
    if not path.is_file():
        return
    state = torch.load(path, weights_only=True)  # never unpickle objects from storage
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
