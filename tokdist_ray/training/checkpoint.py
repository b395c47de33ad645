"""What a distributed run's checkpoint holds, writing it while training goes on, and
reading it back.

    checkpoint_step_00000040/                  (one directory in the run's storage; Ray merges
      progress.json                             the files every worker wrote into it)
      new_rows-00000-of-00004.safetensors      rank 0's slice of the fp32 new rows, ...
      new_rows-00003-of-00004.safetensors      ... rank 3's
      rng_rank{r}.pt                           RNG states of rank r
      optimizer/                               the strategy's optimizer state (strategies.py):
                                               DDP's in slices too, DeepSpeed's own shards

Every rank holds the whole new rows (ZeRO-3 gathers them for the checkpoint) and, under
DDP, the whole optimizer state, so each rank writes a contiguous 1/world slice of them:
rank 0 alone used to write all of it (1.5 GB at 30,000 x 4,096) while the others waited.
Every rank reads every slice back, whatever the world size that wrote them.

The data position is the step: the snippet schedule (schedule.py) maps it to the exact
snippets that come next.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed
from safetensors.torch import load_file, save_file

from tokdist_ray.errors import TrainingDivergedError
from tokdist_ray.training.progress import TrainingHistory
from tokdist_ray.training.run_manifest import CHECKPOINT_PREFIX

PROGRESS = "progress.json"
ROW_SLICES = "new_rows"  # + -{rank}-of-{world}.safetensors
MOMENTS = "moments"  # the per-row optimizer state (AdamW's moments) in slices, as ROW_SLICES
OPTIMIZER_DIR = "optimizer"

log = logging.getLogger("tokdist_ray")


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


def start_checkpoint(directory: Path, parallel, progress: Progress, rows: dict[str, torch.Tensor], rank: int,
                     world: int) -> Callable[[], None]:
    """This rank's part of a checkpoint in two halves. Now, on the training thread: what it
    holds (its slice of `rows`, which must be a copy on the CPU that no step changes, as
    `parallel.full_rows()` hands out; its RNG states; rank 0 the progress), and the
    strategy's part (`parallel.save`: DDP copies its slice of the optimizer state, DeepSpeed
    writes its shard, a collective under ZeRO, so every rank calls this at the same step).
    Returned: the writer of the files, for any thread, as later steps cannot change them."""
    write_optimizer = parallel.save(directory / OPTIMIZER_DIR, rank, world)
    rows_slice = slice_of(rows, rank, world)
    rng = rng_state()
    progress_json = json.dumps(progress.as_dict()) if rank == 0 else None

    def write() -> None:
        write_optimizer()
        write_slice(directory, ROW_SLICES, rows_slice, rank, world)
        torch.save(rng, directory / f"rng_rank{rank}.pt")
        if progress_json is not None:
            (directory / PROGRESS).write_text(progress_json, encoding="utf-8")

    return write


def write_checkpoint(directory: Path, parallel, progress: Progress, rows: dict[str, torch.Tensor], rank: int) -> None:
    """This rank's part of a checkpoint, written now; every rank of the process group calls it."""
    start_checkpoint(directory, parallel, progress, rows, rank, torch.distributed.get_world_size())()


def read_checkpoint(directory: Path, parallel, rank: int) -> tuple[Progress, dict[str, torch.Tensor]]:
    """(progress, rows) of a checkpoint, loaded into the strategy `parallel` with this rank's
    RNG states; the progress records the step it resumed at."""
    progress = read_progress(directory)
    rows = read_slices(directory, ROW_SLICES)
    parallel.load(directory / OPTIMIZER_DIR, rows)
    restore_rng(directory, rank)
    progress.resumed_from.append(progress.step)
    return progress, rows


# ------------------------------------------------------------------- slices by rank
def slice_of(tensors: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s contiguous slice of each tensor along its first dimension (ranks
    0..n % world - 1 take one more): views."""
    return {name: torch.tensor_split(t.detach(), world)[rank] for name, t in tensors.items()}


def cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies in CPU memory, which later in-place steps on the originals leave as they are."""
    return {name: t.to("cpu", copy=True) for name, t in tensors.items()}


def write_slice(directory: Path, name: str, tensors: dict[str, torch.Tensor], rank: int, world: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / f"{name}-{rank:05d}-of-{world:05d}.safetensors"))


def read_slices(directory: Path, name: str) -> dict[str, torch.Tensor]:
    """The whole tensors from the slices `write_slice` wrote, one file per rank, joined in
    rank order: the same on every reader, whichever world size wrote them."""
    by_world: dict[int, dict[int, Path]] = {}
    for path in directory.glob(f"{name}-*-of-*.safetensors"):
        match = re.fullmatch(rf"{re.escape(name)}-(\d+)-of-(\d+)\.safetensors", path.name)
        if match:
            by_world.setdefault(int(match[2]), {})[int(match[1])] = path
    if not by_world:
        raise FileNotFoundError(f"checkpoint {directory} holds no {name} slices ({name}-RANK-of-WORLD.safetensors)")
    if len(by_world) > 1:
        raise FileNotFoundError(f"checkpoint {directory} mixes {name} slices of world sizes {sorted(by_world)}")
    [(world, files)] = by_world.items()
    missing = sorted(set(range(world)) - set(files))
    if missing:
        raise FileNotFoundError(f"checkpoint {directory} is incomplete: the {name} slices of ranks {missing} "
                                f"of {world} are missing")
    slices = [load_file(str(files[rank])) for rank in range(world)]
    return {key: torch.cat([s[key] for s in slices]) for key in slices[0]}


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A torch optimizer's state_dict as (its per-row tensors, named "param.key", which go in
    slices; a copy of the small rest: step counts and hyperparameters)."""
    per_row = {f"{param}.{key}": value for param, values in state["state"].items() for key, value in values.items()
               if isinstance(value, torch.Tensor) and value.dim() > 0}
    rest = {
        "state": {param: {k: v for k, v in values.items() if f"{param}.{k}" not in per_row}
                  for param, values in state["state"].items()},
        "param_groups": state["param_groups"],
    }
    return per_row, copy.deepcopy(rest)  # the optimizer updates its step counts in place


def join_optimizer_state(rest: dict, per_row: dict[str, torch.Tensor]) -> dict:
    """The state_dict `split_optimizer_state` split."""
    for name, value in per_row.items():
        param, key = name.split(".", 1)
        rest["state"].setdefault(int(param), {})[key] = value
    return rest


# ------------------------------------------------------------- writing off the training thread
@dataclass
class _Writing:
    """A checkpoint whose files the background thread writes."""

    directory: Path
    step: int
    metrics: dict
    wait: bool  # published at once and uploaded before training goes on
    written: Future  # -> (bytes, seconds since the checkpoint started) of this rank's files
    waited: float  # seconds the training thread spent on it


class Checkpointer:
    """Checkpoints written on a background thread while training goes on.

    `save` (the loop's save_checkpoint) takes this rank's copies on the training thread and
    leaves the files to a background thread. `publish(directory, step, metrics, wait)` then
    hands the written checkpoint on (worker.py: ray.train.report, uploading it in the
    background unless `wait`). That is a barrier over the ranks in Ray Train (they agree on
    the checkpoint's directory through an actor, call by call), so it runs on the training
    thread, on every rank at the same step: at the first step boundary (`poll`) at which
    every rank's files are written, which one small all-reduce a step tells; before the
    next checkpoint starts; and at once for the last checkpoint, which the export follows,
    and for every one when `in_background` is false (training waits for write and upload).
    """

    def __init__(self, parallel, rank: int, world: int, publish: Callable[[Path, int, dict, bool], None],
                 in_background: bool):
        self._parallel, self._rank, self._world = parallel, rank, world
        self._publish, self._in_background = publish, in_background
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokdist-checkpoint")
        self._writing: _Writing | None = None

    def save(self, progress: Progress, rows: dict[str, torch.Tensor], metrics: dict, last: bool) -> None:
        if self._writing is not None:  # one at a time, published in order
            self._publish_once_written(wait=True)
        started = time.perf_counter()
        directory = Path(tempfile.mkdtemp(prefix="tokdist-ckpt-"))
        write = start_checkpoint(directory, self._parallel, progress, rows, self._rank, self._world)
        written = self._writer.submit(_write_timed, write, directory, started)
        wait = last or not self._in_background
        self._writing = _Writing(directory, progress.step, metrics, wait, written, time.perf_counter() - started)
        if wait:
            self._publish_once_written(wait=True)

    def poll(self) -> None:
        """At a step boundary, on every rank: publish the checkpoint once every rank wrote it."""
        if self._writing is not None:
            self._publish_once_written(wait=False)

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    def _publish_once_written(self, wait: bool) -> None:
        writing, started = self._writing, time.perf_counter()
        if wait:
            wait_for([writing.written])
        done, nbytes, seconds = self._every_rank_written(writing.written)
        if done:
            self._publish(writing.directory, writing.step, writing.metrics, writing.wait)
            self._writing = None
        writing.waited += time.perf_counter() - started
        if done and self._rank == 0:
            log.info("checkpoint at step %d: %s in %.1f s (%s, training waited %.2f s)%s", writing.step,
                     _size(nbytes), seconds, "written before training went on" if writing.wait
                     else "written in the background", writing.waited,
                     "" if writing.wait else ", uploading in the background")

    def _every_rank_written(self, written: Future) -> tuple[bool, float, float]:
        """(whether every rank's files are written, their bytes, the slowest rank's seconds):
        one all-reduce, in which each rank fills its own seconds slot."""
        values = [0.0] * (2 + self._world)
        if written.done():
            nbytes, seconds = written.result()  # a failed write raises here
            values[0], values[1], values[2 + self._rank] = 1.0, nbytes, seconds
        totals = torch.tensor(values, dtype=torch.float64, device=self._parallel.device)
        self._parallel.all_reduce(totals)
        totals = totals.tolist()
        return totals[0] == self._world, totals[1], max(totals[2:])


def _write_timed(write: Callable[[], None], directory: Path, started: float) -> tuple[int, float]:
    write()
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()), time.perf_counter() - started


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 1e3:.1f} kB"


# ---------------------------------------------------------------------------- rows, RNG
def check_finite(rows: dict[str, torch.Tensor | None], step: int) -> None:
    """Before any checkpoint or export: a diverged run stops here and saves nothing broken."""
    for side, values in rows.items():
        if values is not None and not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).any(dim=-1).sum())
            raise TrainingDivergedError(
                f"training diverged: by step {step}, {bad} of {len(values)} new {side} rows hold inf or nan, so "
                "nothing was saved; lower training.learning_rate (or use lr_schedule linear with warmup) and run again"
            )


def rng_state() -> dict:
    """This process's RNG states, as `restore_rng` restores them."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


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
