"""Checkpoints written by every rank (training/checkpoint.py): each rank writes its slice of
the new rows and of DDP's AdamW moments, the slices join back bit for bit under another
world size, and training goes on while a checkpoint is written. No Ray: gloo processes."""

import copy
import shutil
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from tests.helpers import in_gloo_ranks, tiny_setup
from tokdist_ray.config import DistillationConfig
from tokdist_ray.training import checkpoint, strategies
from tokdist_ray.training.checkpoint import (
    MOMENTS,
    OPTIMIZER_DIR,
    ROW_SLICES,
    Checkpointer,
    Progress,
    read_checkpoint,
    read_slices,
    slice_of,
    write_checkpoint,
    write_slice,
)
from tokdist_ray.training.loop import AlignedExamples, train_loop
from tokdist_ray.training.schedule import SnippetSchedule, make_optimizer
from tokdist_ray.training.strategies import DataParallel
from tokdist_ray.training.worker import _polling

N_ROWS, WIDTH = 7, 4  # 7 rows: slices of 4 and 3 on 2 ranks, 3, 2 and 2 on 3
TRAINING = DistillationConfig(learning_rate=1e-2, lr_schedule="linear", warmup_ratio=0.5)
STEPS = 3


def assert_same_bits(a, b) -> None:
    """Equal state trees; floats compared by their bits (torch.equal takes -0.0 for +0.0)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_bits(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_bits(x, y)
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)) if a.dtype == torch.float32 else torch.equal(a, b)
    else:
        assert a == b


# ------------------------------------------------------------------ slices, no processes
def test_slices_join_back_bit_for_bit_whatever_the_world_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"input": torch.randn(N_ROWS, WIDTH, generator=g), "few": torch.randn(2, WIDTH, generator=g)}
    for world in (1, 3, 5):  # 5: more ranks than rows of "few", whose last slices are empty
        directory = tmp_path / f"world{world}"
        for rank in range(world):
            write_slice(directory, "rows", slice_of(tensors, rank, world), rank, world)
        assert len(list(directory.iterdir())) == world
        assert_same_bits(read_slices(directory, "rows"), tensors)


def test_an_incomplete_or_mixed_checkpoint_fails_in_one_line(tmp_path):
    tensors = {"input": torch.randn(N_ROWS, WIDTH)}
    for rank in (0, 2):  # rank 1 of 3 never wrote
        write_slice(tmp_path, "rows", slice_of(tensors, rank, 3), rank, 3)
    with pytest.raises(FileNotFoundError, match=r"incomplete: the rows slices of ranks \[1\] of 3 are missing"):
        read_slices(tmp_path, "rows")
    write_slice(tmp_path, "rows", slice_of(tensors, 0, 1), 0, 1)
    with pytest.raises(FileNotFoundError, match=r"mixes rows slices of world sizes \[1, 3\]"):
        read_slices(tmp_path, "rows")
    with pytest.raises(FileNotFoundError, match="holds no moments slices"):
        read_slices(tmp_path, "moments")


# ---------------------------------------------------------- DDP on gloo processes
class _Rows(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.input = nn.Parameter(torch.randn(N_ROWS, WIDTH, generator=g))
        self.output = nn.Parameter(torch.randn(N_ROWS, WIDTH, generator=g))


class _Distiller(nn.Module):
    """What DataParallel's save and load touch of a TokenDistiller: its new rows."""

    def __init__(self, seed: int):
        super().__init__()
        self.rows = _Rows(seed)


def _data_parallel(seed: int) -> DataParallel:
    distiller = _Distiller(seed)
    optimizer, schedule = make_optimizer(list(distiller.parameters()), TRAINING, total_steps=2 * STEPS)
    return DataParallel(distiller, optimizer, schedule, torch.device("cpu"))


def _steps(parallel: DataParallel, steps: range) -> None:
    """AdamW steps on gradients fixed by the step number, the same on every rank."""
    for step in steps:
        g = torch.Generator().manual_seed(step)
        for p in parallel.distiller.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        parallel.optimizer.step()
        parallel.schedule.step()


def _state(parallel: DataParallel) -> dict:
    return copy.deepcopy({"rows": parallel.full_rows(), "optimizer": parallel.optimizer.state_dict(),
                          "schedule": parallel.schedule.state_dict()})


def _train_and_write(rank: int, out: str) -> dict:
    """STEPS steps, then this rank's part of the checkpoint into out/rank{rank}; one more step."""
    parallel = _data_parallel(seed=0)
    _steps(parallel, range(STEPS))
    written = _state(parallel)
    write_checkpoint(Path(out) / f"rank{rank}", parallel, Progress(step=STEPS), parallel.full_rows(), rank)
    _steps(parallel, range(STEPS, STEPS + 1))
    return {"written": written, "next": parallel.full_rows()}


def _read_and_step(rank: int, directory: str) -> dict:
    parallel = _data_parallel(seed=1)  # other rows: the checkpoint must set them
    progress, _ = read_checkpoint(Path(directory), parallel, rank)
    loaded = _state(parallel)
    _steps(parallel, range(STEPS, STEPS + 1))
    return {"step": progress.step, "loaded": loaded, "next": parallel.full_rows()}


def test_each_rank_writes_its_share_and_another_world_size_resumes_bit_for_bit(tmp_path):
    writers = in_gloo_ranks(2, tmp_path, _train_and_write, str(tmp_path))
    written = writers[0]["written"]
    assert_same_bits(writers[1]["written"], written)  # DDP: the same state on every rank
    moments = {f"{param}.{key}": value for param, state in written["optimizer"]["state"].items()
               for key, value in state.items() if key != "step"}
    for rank, rows_held in enumerate((4, 3)):
        directory = tmp_path / f"rank{rank}"
        only_rank_0 = {"progress.json", f"{OPTIMIZER_DIR}/optimizer.pt"} if rank == 0 else set()
        assert {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} == only_rank_0 | {
            f"{ROW_SLICES}-0000{rank}-of-00002.safetensors", f"{OPTIMIZER_DIR}/{MOMENTS}-0000{rank}-of-00002.safetensors",
            f"rng_rank{rank}.pt"}
        rows = load_file(directory / f"{ROW_SLICES}-0000{rank}-of-00002.safetensors")
        assert_same_bits(rows, slice_of(written["rows"], rank, 2))
        assert rows["input"].shape == (rows_held, WIDTH)
        assert_same_bits(load_file(directory / OPTIMIZER_DIR / f"{MOMENTS}-0000{rank}-of-00002.safetensors"),
                         slice_of(moments, rank, 2))

    merged = tmp_path / "merged"  # as Ray Train merges every worker's files into one directory
    for rank in range(2):
        shutil.copytree(tmp_path / f"rank{rank}", merged, dirs_exist_ok=True)
    (tmp_path / "readers").mkdir()
    readers = in_gloo_ranks(3, tmp_path / "readers", _read_and_step, str(merged))
    for reader in readers:
        assert reader["step"] == STEPS
        assert_same_bits(reader["loaded"], written)
        assert_same_bits(reader["next"], writers[0]["next"])  # and training goes on as if never stopped


# ------------------------------------------------------------ writing in the background
@pytest.fixture
def one_rank(tmp_path):
    """A gloo process group of this process alone, for DataParallel."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_training_goes_on_while_a_checkpoint_is_written(one_rank, tiny_model_dir, tmp_path, monkeypatch):
    distiller, examples, _ = tiny_setup(tiny_model_dir())
    cfg = DistillationConfig(epochs=3, batch_size=1, learning_rate=1e-2, mixed_precision=False, max_steps=9)
    snippets = AlignedExamples(examples)
    schedule = SnippetSchedule.for_run(snippets.student_ids, distiller.new_start, cfg)
    optimizer, lr_schedule = make_optimizer([p for p in distiller.parameters() if p.requires_grad], cfg,
                                            schedule.total_steps(cfg))
    parallel = DataParallel(distiller, optimizer, lr_schedule, torch.device("cpu"))

    # the first checkpoint's files (moments, then rows) are written only once the loop is two steps further
    at_step, released, waits = [0], threading.Event(), []

    def slow_write_slice(directory, name, tensors, rank, world):
        if not waits:
            waits.append(released.wait(timeout=60))  # False: training waited for the write
        write_slice(directory, name, tensors, rank, world)

    def release(step: int, rank: int) -> None:
        at_step[0] = step
        if step == 6:
            released.set()

    published, taken = [], {}

    def publish(directory: Path, step: int, metrics: dict, wait: bool) -> None:
        published.append((step, at_step[0], wait))
        taken[step]["published"] = {"rows": read_slices(directory, ROW_SLICES),
                                    "moments": read_slices(directory / OPTIMIZER_DIR, MOMENTS)}

    checkpoints = Checkpointer(parallel, 0, 1, publish, in_background=True)

    def save(progress, rows, metrics, last):
        moments, _ = checkpoint.split_optimizer_state(optimizer.state_dict())
        taken[progress.step] = {"rows": rows, "moments": copy.deepcopy(moments)}
        checkpoints.save(progress, rows, metrics, last)

    monkeypatch.setattr(checkpoint, "write_slice", slow_write_slice)
    monkeypatch.setattr(strategies, "write_slice", slow_write_slice)
    try:
        train_loop(parallel, snippets, schedule, cfg, checkpoint_every=4, after_step=_polling(checkpoints, release),
                   save_checkpoint=save)
    finally:
        checkpoints.close()
    assert waits == [True]
    first, *later = published
    assert first[0] == 4 and first[1] >= 6 and not first[2]  # published after the loop stepped past it
    assert [(step, wait) for step, _, wait in later] == [(8, False), (9, True)]  # the last one waited for
    for step in (4, 8, 9):  # each holds the state of its step, not of when it was written
        assert_same_bits(taken[step]["published"], {k: taken[step][k] for k in ("rows", "moments")})
    assert not torch.equal(taken[4]["rows"]["input"], taken[9]["rows"]["input"])


class _FailingWrites:
    device = torch.device("cpu")

    def save(self, directory, rank, world):
        def write():
            raise OSError("disk full")

        return write

    def all_reduce(self, tensor):
        pass


def test_a_failed_background_write_stops_training(tmp_path):
    checkpoints = Checkpointer(_FailingWrites(), 0, 1, lambda *args: None, in_background=True)
    rows = {"input": torch.zeros(N_ROWS, WIDTH)}
    checkpoints.save(Progress(step=1), rows, {}, last=False)  # returns while the write fails behind it
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save(Progress(step=2), rows, {}, last=False)
    checkpoints.close()
