"""The training runs bench/gpu_check.py checks, on a tiny random Llama and synthetic snippets:
the single-process loop (strategies.Local), DDP and DeepSpeed ZeRO ranks built by the Ray
worker's own `worker.parallel_distiller`, a resume from a checkpoint, and the streamed export.

Ranks are torch.multiprocessing processes that form their process group with env:// (no
Ray); the loop, the strategies and the checkpoint code are the product's. On the device
machine's one GPU every rank uses cuda:0, and NCCL refuses two ranks on one device. So
DDP's two ranks share the GPU over gloo, which stages CUDA tensors through host memory
for the all-reduce and broadcast that DDP and the loop use. ZeRO runs one rank over NCCL
by default: its collectives of CUDA tensors are NCCL's in production, and one rank still
runs the engine's whole path (bf16 engine, partitioned weights gathered and released
around each layer, its checkpoint format); two ranks sharing the GPU over gloo can be
asked for (--zero-ranks 2). Sharding over two ranks is tested on CPU
(tests/integration/test_train_distributed.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from tokdist_ray.config import DistillationConfig, OutputEmbeddingInit
from tokdist_ray.export.model import ROWS
from tokdist_ray.training.checkpoint import (
    Progress,
    checkpoint_name,
    read_checkpoint,
    read_progress,
    write_checkpoint,
    write_progress,
)
from tokdist_ray.training.loop import SnippetIds, train_loop
from tokdist_ray.training.rows import initial_rows
from tokdist_ray.training.schedule import SnippetSchedule, make_optimizer
from tokdist_ray.training.step import TokenDistiller, bf16_supported
from tokdist_ray.training.strategies import Local, model_dtype
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.models import load_model
from tokdist_ray.vocab.tokens import NewToken
from tokdist_ray.vocab.weights import read_rows, write_rows

FAIL_STEP = "TOKDIST_GPU_CHECK_FAIL_STEP"  # set by gpu_check.py --fail-at for the stage it names
# the job's default for an untied model such as Llama-3 (job.config.OutputConfig): the first
# piece's output rows, kept fixed, so the input rows are the only trainable table
POLICY = OutputEmbeddingInit.FIRST_PIECE
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
# 24 snippets at a global batch of 4: 6 steps an epoch, 18 in all; the checkpoint at step 8
# lies inside the second epoch, so a resume restores the data position, the linear schedule
# and the optimizer's moments
TRAINING = DistillationConfig(epochs=3, batch_size=4, learning_rate=1e-2, seed=3, lr_schedule="linear",
                              warmup_ratio=0.2, log_every=1)
CHECKPOINT_STEP = 8
INITIAL_ROWS = "initial_rows.safetensors"
PRECISION = "precision.json"  # a run's PrecisionProbe report


class InjectedFailure(RuntimeError):
    pass


def fail_if_injected(step: int, rank: int) -> None:
    """An `after_step` hook: raise at the step that FAIL_STEP names (stops a stage on purpose)."""
    if os.environ.get(FAIL_STEP) == str(step):
        raise InjectedFailure(f"failure injected at step {step} on rank {rank} (--fail-at)")


class PrecisionProbe:
    """The dtypes that steps leave the training state in: the trainable rows, their
    gradients (as autograd hands them to the rows, before DeepSpeed or DDP take them over)
    and the optimizer's moments. The design keeps all three fp32 under bf16 (fp32 master
    rows); `require_fp32` checks a report."""

    def __init__(self, distiller: TokenDistiller):
        self.rows = list(distiller.rows.parameters())  # fixed output rows are a buffer, not a parameter
        self.grads: set[str] = set()
        for param in self.rows:
            param.register_hook(lambda grad: self.grads.add(dtype_name(grad.dtype)))

    def report(self, strategy) -> dict[str, list[str]]:
        state = innermost_optimizer(strategy).state.values()
        return {"rows": sorted({dtype_name(p.dtype) for p in self.rows}), "grads": sorted(self.grads),
                "moments": sorted({dtype_name(t.dtype) for s in state for t in s.values() if torch.is_tensor(t) and t.dim()})}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def innermost_optimizer(strategy) -> torch.optim.Optimizer:
    """The torch optimizer that holds the moments: the strategy's own, or the one DeepSpeed's
    ZeRO optimizer wraps (over its fp32 partitions)."""
    optimizer = strategy.engine.optimizer if hasattr(strategy, "engine") else strategy.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def require_fp32(report: dict[str, list[str]], label: str) -> None:
    wrong = {part: dtypes for part, dtypes in report.items() if dtypes != ["float32"]}
    if wrong:
        raise AssertionError(f"{label}: the training state must be fp32 (rows, their gradients, the optimizer's "
                             f"moments); got {wrong} (an empty list: none seen)")


@dataclass(frozen=True)
class CheckData:
    """What every run of the check shares: the model, its new tokens and their snippets."""

    model_dir: str
    new_start: int
    phrases: tuple[tuple[int, ...], ...]  # each new id's original pieces
    snippets: tuple[tuple[int, ...], ...]  # student ids: [BOS] + a window holding new ids
    training: DistillationConfig  # the global batch
    use_gpu: bool

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if self.use_gpu else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.use_gpu, self.training.mixed_precision, bf16_supported(self.device))

    def snippet_ids(self) -> SnippetIds:
        return SnippetIds(pa.array(self.snippets, pa.list_(pa.int32())), PieceAligner(self.phrases, self.new_start))

    def schedule(self) -> SnippetSchedule:
        return SnippetSchedule.for_run(self.snippet_ids().student_ids, self.new_start, self.training)


def synthetic_snippets(vocab: int, n_new: int, count: int, length: int, seed: int):
    """(phrases, snippets): n_new new ids of 2-3 random pieces, and `count` snippets of
    [BOS=1] + `length` random ids, each holding one or two new ids at random places."""
    rng = np.random.default_rng(seed)
    phrases = tuple(tuple(int(i) for i in rng.integers(2, vocab, rng.integers(2, 4))) for _ in range(n_new))
    snippets = []
    for _ in range(count):
        ids = rng.integers(2, vocab, length)
        places = rng.choice(length, size=rng.integers(1, 3), replace=False)
        ids[places] = vocab + rng.integers(0, n_new, len(places))
        snippets.append((1, *map(int, ids)))
    return phrases, tuple(snippets)


def tiny_check_data(root: Path, use_gpu: bool) -> CheckData:
    """A random 2-layer Llama (hidden 64, untied) saved under `root`, 6 new ids, 24 snippets."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model_dir = root / "tiny-llama"
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(model_dir)
    phrases, snippets = synthetic_snippets(TINY["vocab_size"], n_new=6, count=24, length=15, seed=0)
    return CheckData(str(model_dir), TINY["vocab_size"], phrases, snippets, TRAINING, use_gpu)


# ---------------------------------------------------------------------------- one process
def train_single_process(data: CheckData, out: Path) -> dict:
    """The loop under strategies.Local, as the API runs it; writes the initial and final
    rows and the progress under `out`."""
    model = load_model(data.model_dir, dtype=data.dtype, device=data.device)
    rows = initial_rows(model, data.phrases, POLICY, "fvt")
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / INITIAL_ROWS, {"input": rows.input, "output": rows.output})
    distiller = TokenDistiller.from_config(model, rows, data.new_start, data.training).to(data.device)
    schedule = data.schedule()
    optimizer, lr_schedule = make_optimizer([p for p in distiller.parameters() if p.requires_grad], data.training,
                                            schedule.total_steps(data.training))
    torch.manual_seed(data.training.seed)
    local = Local(distiller, optimizer, lr_schedule)
    probe = PrecisionProbe(distiller)
    progress, final = train_loop(local, data.snippet_ids(), schedule, data.training, after_step=fail_if_injected)
    _write_result(out, progress, final)
    return {"model_dtype": dtype_name(next(model.parameters()).dtype), "precision": probe.report(local),
            "autocast_bf16": data.training.mixed_precision and bf16_supported(data.device)}


# ---------------------------------------------------------------------------- ranks
@dataclass(frozen=True)
class StrategyPlan:
    """The fields of ray_trainer.WorkerPlan that worker.parallel_distiller reads."""

    model_path: str
    use_gpu: bool
    training: DistillationConfig  # the per-rank batch
    strategy: str  # "ddp" | "deepspeed"
    zero_stage: int | None
    tokens: tuple[NewToken, ...]
    output_emb_policy: OutputEmbeddingInit = POLICY
    pre_init_strategy: str = "fvt"
    deepspeed_overrides: dict | None = None


@dataclass(frozen=True)
class RankedRun:
    strategy: str
    zero_stage: int | None
    world: int
    out: str  # rank 0 writes the result here; checkpoints go to out/checkpoint_step_*
    checkpoint_every: int = 0
    resume_from: str | None = None  # a checkpoint directory


def backend(use_gpu: bool, world: int) -> str:
    """NCCL for one rank on the GPU; gloo for ranks sharing it, and on the CPU."""
    return "nccl" if use_gpu and world == 1 else "gloo"


def train_ranks(data: CheckData, run: RankedRun) -> None:
    """Run the loop on `run.world` spawned ranks; a rank's exception ends them all and is
    raised here (torch.multiprocessing.ProcessRaisedException, with its traceback)."""
    import torch.multiprocessing

    Path(run.out).mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.start_processes(_rank_main, args=(data, run, _free_port()), nprocs=run.world,
                                          start_method="spawn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, data: CheckData, run: RankedRun, port: int) -> None:
    from tokdist_ray.training.worker import parallel_distiller

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(run.world),
                      LOCAL_RANK="0" if data.use_gpu else str(rank))  # every rank on cuda:0
    if data.use_gpu:
        torch.cuda.set_device(data.device)
    else:  # ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // run.world))
    torch.distributed.init_process_group(backend(data.use_gpu, run.world), init_method="env://", timeout=timedelta(minutes=5))
    try:
        cfg = data.training
        plan = StrategyPlan(data.model_dir, data.use_gpu, dataclasses.replace(cfg, batch_size=cfg.batch_size // run.world),
                            run.strategy, run.zero_stage, tuple(NewToken(f"<new {i}>", p) for i, p in enumerate(data.phrases)))
        schedule = data.schedule()
        torch.manual_seed(cfg.seed)
        parallel = parallel_distiller(plan, data.new_start, schedule.total_steps(cfg), run.world, data.device)
        probe = PrecisionProbe(parallel.distiller)
        progress = read_checkpoint(Path(run.resume_from), parallel, rank)[0] if run.resume_from else None
        out = Path(run.out)

        def save(progress: Progress, rows: dict, metrics: dict, last: bool) -> None:
            directory = out / checkpoint_name(progress.step)
            directory.mkdir(parents=True, exist_ok=True)
            write_checkpoint(directory, parallel, progress, rows, rank)

        progress, final = train_loop(parallel, data.snippet_ids(), schedule, cfg, progress, rank=rank, world=run.world,
                                     checkpoint_every=run.checkpoint_every, after_step=fail_if_injected,
                                     save_checkpoint=save if run.checkpoint_every else None)
        if rank == 0:
            _write_result(out, progress, final)
            (out / PRECISION).write_text(json.dumps(probe.report(parallel)))
        # leave together: a rank that tore gloo down while the other still wrote aborted once
        # in CI ("terminate called without an active exception", SIGABRT)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------- results
def _write_result(out: Path, progress: Progress, rows: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / ROWS, rows)
    write_progress(out, progress)


def read_result(out: Path) -> tuple[dict[str, torch.Tensor], Progress]:
    return read_rows(out / ROWS), read_progress(out)


def read_precision(out: Path) -> dict[str, list[str]]:
    return json.loads((out / PRECISION).read_text())


def losses(progress: Progress) -> list[float]:
    return [point["loss"] for point in progress.history.loss_curve]


def rows_gap(rows: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> float:
    """How far `rows` are from `reference`, as a share of how far training moved the
    reference from the initial rows (Frobenius norms; the worse of input and output). A
    table that training left as it was (first_piece's output rows) must come back exactly:
    any difference is an infinite gap."""
    def gap(name: str) -> float:
        moved, off = (reference[name] - initial[name]).norm(), (rows[name] - reference[name]).norm()
        return float(off / moved) if moved > 0 else (0.0 if off == 0 else math.inf)

    return max(gap(name) for name in reference)


def export_round_trip(data: CheckData, rows: dict[str, torch.Tensor], out: Path) -> dict:
    """Write the tiny model with `rows` by export.streamed, load it back with
    transformers and check every row: old rows as they were, new rows as trained, and a
    forward pass over new ids."""
    from transformers import AutoModelForCausalLM

    from tokdist_ray.export.streamed import export_streamed

    fail_if_injected(1, 0)  # the export has no steps: --fail-at export fails it here
    exported = export_streamed(data.model_dir, data.new_start, rows, out)
    original = AutoModelForCausalLM.from_pretrained(data.model_dir, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    n = data.new_start + len(rows["input"])
    for side, new, old in (("input", model.get_input_embeddings(), original.get_input_embeddings()),
                           ("output", model.get_output_embeddings(), original.get_output_embeddings())):
        table = new.weight
        if table.shape[0] != n:
            raise AssertionError(f"exported {side} table has {table.shape[0]} rows, expected {n}")
        if not torch.equal(table[: data.new_start], old.weight):
            raise AssertionError(f"exported {side} table changed old rows")
        if not torch.equal(table[data.new_start:], rows[side].to(table.dtype)):
            raise AssertionError(f"exported {side} table does not hold the trained rows")
    model.to(data.device)
    ids = torch.tensor([data.snippets[0]], device=data.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not bool(torch.isfinite(logits).all()) or logits.shape[-1] != n:
        raise AssertionError(f"exported model's logits: shape {tuple(logits.shape)}, finite {bool(torch.isfinite(logits).all())}")
    size = sum(f.stat().st_size for f in Path(exported).iterdir())
    return {"vocab": n, "bytes": size, "files": sorted(f.name for f in Path(exported).iterdir())}
