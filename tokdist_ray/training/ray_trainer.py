"""Distributed distillation on Ray Train: DDP or DeepSpeed ZeRO, checkpoints, recovery.

    result = distill_distributed(
        "bundled:smollm2", "snippets/", tokens, "out/",
        training=DistillationConfig(batch_size=8),            # per worker
        dist=DistributedConfig(num_workers=4, use_gpu=True, strategy="auto", checkpoint_every=200),
    )

Every worker runs the engine's step (distill.TokenDistiller) on its slice of each global
batch (per-worker batch x workers, the same batches as `loop.train_local` would see, see
shards.py). Each worker's loss is weighted by its share of the global batch's loss
positions before the strategy averages gradients, so a step equals the single-process
step on the whole global batch. Every `log_every` steps rank 0 prints loss, snippets/s,
tokens/s, elapsed and ETA, and the loss curve grows; the same metrics go to Ray with each
checkpoint. Checkpoints go to Ray's storage path every `checkpoint_every` steps and at
the end (checkpoint.py); a restarted worker group, or a run started again with
`resume=True`, continues from the latest one. Rank 0 exports the expanded model with the
engine's export and writes report.json: Ray's `Result.metrics` is not relied on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow.fs
import torch
import torch.distributed as torch_dist

from tokdist_ray.vocab.alignment import PhraseMerger
from tokdist_ray.training.batching import collate, merge_snippets
from tokdist_ray.training.checkpoint import (
    OPTIMIZER_DIR,
    ROWS,
    Progress,
    checkpoint_name,
    read_progress,
    read_rows,
    restore_rng,
    save_rng,
    write_progress,
    write_rows,
)
from tokdist_ray.config import DistillationConfig, DistributedConfig, OutputEmbeddingInit
from tokdist_ray.training.step import TokenDistiller, bf16_supported
from tokdist_ray.vocab.export import expand_model, expand_tokenizer, save_expanded
from tokdist_ray.training.rows import PRE_INIT_STRATEGIES, initial_rows
from tokdist_ray.training.local import eta_seconds, make_optimizer, total_steps
from tokdist_ray.vocab.models import load_model, load_tokenizer, resolve_model_path
from tokdist_ray.training.strategies import DataParallel, DeepSpeedZero, deepspeed_config
from tokdist_ray.training.run_manifest import RunDirectory, manifest
from tokdist_ray.training.snippet_schedule import SnippetSchedule, read_snippets
from tokdist_ray.vocab.tokens import NewToken

log = logging.getLogger("tokdist_ray")

# Test-only fault injection: "step:rank:marker" makes that rank exit after that step,
# once (the marker file records that it happened).
CRASH_ENV = "TOKDIST_RAY_CRASH_AT"
# DDP keeps the whole frozen model on each worker; the rest is left for activations.
MODEL_SHARE_OF_WORKER_MEMORY = 0.75


@dataclass
class DistributedResult:
    out_dir: Path  # the expanded HF model directory
    rows_path: Path  # new_rows.safetensors: "input" (and "output") rows, fp32
    report_path: Path
    checkpoint_path: str | None  # the final checkpoint in storage
    report: dict


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs, resolved on the driver."""

    model_path: str  # a local HF directory (resolve_model_path)
    model_name: str  # as the user gave it, for the report
    snippets_path: str
    snippets_filesystem: pyarrow.fs.FileSystem | None
    tokens: tuple[NewToken, ...]
    out_dir: str
    training: DistillationConfig  # batch_size per worker
    num_workers: int
    use_gpu: bool
    strategy: str  # "ddp" | "deepspeed"
    zero_stage: int | None
    deepspeed_overrides: dict | None
    checkpoint_every: int
    storage: str
    output_emb_policy: OutputEmbeddingInit
    pre_init_strategy: str

    @property
    def global_training(self) -> DistillationConfig:
        """The config the single-process loop would run with: the global batch."""
        return dataclasses.replace(self.training, batch_size=self.training.batch_size * self.num_workers)


# ---------------------------------------------------------------------------- driver
def distill_distributed(
    model_path: str,
    snippets_path: str,
    tokens: Sequence[NewToken],
    out_dir: str | Path,
    training: DistillationConfig = DistillationConfig(),
    dist: DistributedConfig = DistributedConfig(),
    output_emb_policy: OutputEmbeddingInit | str = OutputEmbeddingInit.TRAIN_WITH_CE,
    pre_init_strategy: str = "fvt",
    *,
    snippets_filesystem: pyarrow.fs.FileSystem | None = None,
) -> DistributedResult:
    """Learn the new tokens' rows on `dist.num_workers` Ray Train workers from the
    snippet parquet at `snippets_path` (snippets.SNIPPET_SCHEMA; rows of tokens not in
    `tokens` are ignored), then export the expanded model to `out_dir` (a path rank 0
    can write: local, or a shared filesystem on a cluster).

    Uses the running Ray instance, or starts a local one.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    plan = _plan(model_path, snippets_path, tokens, out_dir, training, dist, output_emb_policy, pre_init_strategy, snippets_filesystem)
    if not ray.is_initialized():
        ray.init()
    strategy, zero_stage = choose_strategy(dist, plan)
    plan = dataclasses.replace(plan, strategy=strategy, zero_stage=zero_stage)
    log.info(
        "distributed distillation: %d tokens, %d workers, %s%s, global batch %d",
        len(plan.tokens), plan.num_workers, plan.strategy,
        f" ZeRO-{plan.zero_stage}" if plan.zero_stage else "", plan.global_training.batch_size,
    )
    run = RunDirectory(plan.storage, dist.run_name, dist.storage_filesystem)
    run.claim(manifest(plan), dist.resume)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"plan": plan},
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=dist.num_workers, use_gpu=dist.use_gpu, resources_per_worker=_worker_resources(dist)
        ),
        run_config=RunConfig(
            name=dist.run_name,
            storage_path=plan.storage,
            storage_filesystem=dist.storage_filesystem,
            failure_config=FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=dist.keep_checkpoints),
            worker_runtime_env={"env_vars": _worker_env(dist)},
        ),
    )
    result = trainer.fit()
    out = Path(plan.out_dir)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    run.mark_finished(str(out))
    return DistributedResult(out, out / ROWS, out / "report.json", checkpoint, report)


def _plan(model_path, snippets_path, tokens, out_dir, training, dist, output_emb_policy, pre_init_strategy, snippets_fs) -> WorkerPlan:
    """Validate the arguments up front, before any worker starts."""
    if not isinstance(training, DistillationConfig):
        raise TypeError(f"training must be a DistillationConfig, not {type(training).__name__}")
    if not isinstance(dist, DistributedConfig):
        raise TypeError(f"dist must be a DistributedConfig, not {type(dist).__name__}")
    try:
        output_emb_policy = OutputEmbeddingInit(output_emb_policy)
    except ValueError:
        raise ValueError(
            f"output_emb_policy must be one of {[p.value for p in OutputEmbeddingInit]}, got {output_emb_policy!r}"
        ) from None
    if pre_init_strategy not in PRE_INIT_STRATEGIES:
        raise ValueError(f"pre_init_strategy must be one of {PRE_INIT_STRATEGIES}, got {pre_init_strategy!r}")
    tokens = tuple(tokens)
    if not tokens or not all(isinstance(t, NewToken) for t in tokens):
        raise ValueError("tokens must be a non-empty list of NewToken (see tokens.select_new_tokens)")
    out = Path(out_dir).expanduser().resolve()
    storage = dist.storage_path or str(out.parent / f"{out.name}.checkpoints")
    if dist.storage_filesystem is None and "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    # Ray Train starts workers in their own artifacts directory: relative paths would miss.
    if snippets_fs is None and "://" not in snippets_path:
        snippets_path = str(Path(snippets_path).expanduser().resolve())
    return WorkerPlan(
        model_path=resolve_model_path(model_path), model_name=model_path, snippets_path=snippets_path,
        snippets_filesystem=snippets_fs, tokens=tokens, out_dir=str(out), training=training,
        num_workers=dist.num_workers, use_gpu=dist.use_gpu, strategy=dist.strategy, zero_stage=dist.zero_stage,
        deepspeed_overrides=dist.deepspeed_config, checkpoint_every=dist.checkpoint_every, storage=storage,
        output_emb_policy=output_emb_policy, pre_init_strategy=pre_init_strategy,
    )


def _worker_resources(dist: DistributedConfig) -> dict:
    return {"CPU": dist.cpus_per_worker, **({"GPU": 1} if dist.use_gpu else {})}


def _worker_env(dist: DistributedConfig) -> dict[str, str]:
    env = {} if dist.use_gpu else {"DS_ACCELERATOR": "cpu"}
    if os.environ.get(CRASH_ENV):
        env[CRASH_ENV] = os.environ[CRASH_ENV]
    return env


# ---------------------------------------------------------------------------- strategy
def choose_strategy(dist: DistributedConfig, plan: WorkerPlan) -> tuple[str, int | None]:
    """(strategy, ZeRO stage) to run; "auto" compares the frozen model with a worker's memory."""
    if dist.strategy == "ddp":
        return "ddp", None
    if dist.strategy == "deepspeed":
        return "deepspeed", dist.zero_stage or 3
    need = model_bytes(plan.model_path, _model_dtype(plan, gpu_runs_bf16=True))
    have = int(dist.worker_memory_gb * 2**30) if dist.worker_memory_gb else probe_worker_memory(dist)
    choice = pick_strategy(need, have)
    log.info("strategy auto: model %.2f GB, worker memory %.2f GB -> %s", need / 2**30, have / 2**30, choice[0])
    return choice


def pick_strategy(model_bytes: int, worker_bytes: int) -> tuple[str, int | None]:
    if model_bytes <= MODEL_SHARE_OF_WORKER_MEMORY * worker_bytes:
        return "ddp", None
    return "deepspeed", 3


def model_bytes(model_path: str, dtype: torch.dtype) -> int:
    """Parameter count x dtype size, counted on the meta device (nothing is loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def probe_worker_memory(dist: DistributedConfig) -> int:
    """A GPU's memory, or on CPU a node's memory shared by the workers (all on one node, at worst)."""
    import ray

    @ray.remote(num_cpus=0, num_gpus=1 if dist.use_gpu else 0)
    def device_memory() -> int:
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    memory = ray.get(device_memory.remote())
    return memory if dist.use_gpu else memory // dist.num_workers


def _model_dtype(plan: WorkerPlan, gpu_runs_bf16: bool) -> torch.dtype:
    """bf16 weights on GPUs that run bf16 under mixed precision; fp32 elsewhere (CPU
    autocast still computes in bf16 where the CPU supports it)."""
    if plan.use_gpu and plan.training.mixed_precision and gpu_runs_bf16:
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------- worker
def train_worker(config: dict) -> None:
    """The per-worker training loop (TorchTrainer's train_loop_per_worker)."""
    import ray.train

    plan: WorkerPlan = config["plan"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg = plan.global_training
    torch.manual_seed(cfg.seed)
    device = _device(plan.use_gpu)

    snippets = read_snippets(plan.snippets_path, [t.text for t in plan.tokens], plan.snippets_filesystem)
    if not snippets.ids:
        raise ValueError(f"no snippets of the {len(plan.tokens)} new tokens under {plan.snippets_path}")
    schedule = SnippetSchedule(len(snippets.ids), cfg.batch_size, cfg.seed)
    steps = total_steps(len(snippets.ids), cfg)
    natural_steps = cfg.epochs * schedule.batches_per_epoch
    tokenizer = load_tokenizer(plan.model_path)
    new_start = len(tokenizer)
    merger = PhraseMerger.for_tokens(plan.tokens, new_start)
    parallel = _parallel_distiller(plan, new_start, steps, world, device)

    progress, rows = _restore(parallel, rank)  # rows: None until a checkpoint holds them
    meter = _IntervalMeter(rank)
    # Ray gets metrics with each checkpoint only: every ray.train.report waits until the
    # controller (polling every few seconds) took the previous one, so a report per log
    # interval would stall fast steps. Progress lines and the loss curve need no Ray.
    started = time.perf_counter() - progress.history.seconds
    while progress.step < steps:
        indices = schedule.rank_indices(progress.step, rank, world)
        global_batch = schedule.global_indices(progress.step)
        # a rank without snippets in a short last batch still joins the gradient average,
        # with a zero-weighted loss on a borrowed snippet
        examples = merge_snippets(merger, [snippets.ids[i] for i in (indices or global_batch[:1])])
        metrics = _train_step(parallel, collate(examples), world, has_snippets=bool(indices), device=device)
        history = progress.history
        progress.step = history.steps = progress.step + 1
        history.snippets += len(global_batch)
        history.seconds = time.perf_counter() - started
        meter.add(metrics, len(global_batch), sum(len(snippets.ids[i]) for i in global_batch))
        stop = _stop_reason(progress.step, steps, natural_steps, history.seconds, cfg.time_budget_s, device)
        history.stopped_by = stop or history.stopped_by
        _maybe_crash(progress.step, rank)

        at_checkpoint = stop or (plan.checkpoint_every and progress.step % plan.checkpoint_every == 0)
        if at_checkpoint or progress.step % max(1, cfg.log_every) == 0:
            report = meter.flush(progress, schedule.position(progress.step - 1)[0], steps, cfg.time_budget_s)
        if at_checkpoint:
            rows = parallel.full_rows()
            _save_checkpoint(parallel, progress, rows, rank, report)
        if stop:
            break
    if rank == 0:
        del parallel
        _export(plan, rows, progress, snippets.counts)


def _stop_reason(step: int, steps: int, natural_steps: int, seconds: float, budget: float | None, device) -> str | None:
    """Why training ends after this step (as in train_local), or None; the same on every rank."""
    if step == steps:
        return "max_steps" if steps < natural_steps else "completed"
    if budget and _any_rank(seconds >= budget, device):
        return "time_budget"
    return None


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _parallel_distiller(plan: WorkerPlan, new_start: int, steps: int, world: int, device: torch.device):
    dtype = _model_dtype(plan, gpu_runs_bf16=bf16_supported(device))
    model = load_model(plan.model_path, dtype=dtype, device=device)
    rows = initial_rows(model, [t.phrase_ids for t in plan.tokens], plan.output_emb_policy, plan.pre_init_strategy)
    cfg = plan.training
    distiller = TokenDistiller(model, rows, new_start, cfg.loss_methods, cfg.target_layer, cfg.mixed_precision).to(device)
    optimizer, schedule = make_optimizer([p for p in distiller.parameters() if p.requires_grad], cfg, steps)
    if plan.strategy == "ddp":
        return DataParallel(distiller, optimizer, schedule, device)
    config = deepspeed_config(plan.zero_stage, cfg.batch_size, world, dtype == torch.bfloat16, plan.deepspeed_overrides)
    return DeepSpeedZero(distiller, optimizer, schedule, config)


def _train_step(parallel, batch: dict, world: int, has_snippets: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """One optimizer step. The loss is a mean over loss positions, so this rank's loss is
    weighted by its share of the global batch's positions (x world, which the gradient
    average divides out): the step equals the single-process step on the global batch."""
    positions = batch["student_mask"].sum().to(device, torch.float64) if has_snippets else torch.zeros((), dtype=torch.float64, device=device)
    total = positions.clone()
    torch_dist.all_reduce(total)
    share = (positions / total).float()
    metrics = parallel(batch)
    parallel.backward_and_step(metrics["loss"] * share * world)
    return {name: value.detach().float() * share for name, value in metrics.items()}


def _any_rank(flag: bool, device: torch.device) -> bool:
    value = torch.tensor(float(flag), device=device)
    torch_dist.all_reduce(value)
    return bool(value.item())


class _IntervalMeter:
    """Sums the share-weighted step metrics of a report interval; at the interval's end
    all-reduces them into the global batch's mean loss and prints rank 0's progress line."""

    def __init__(self, rank: int):
        self.rank = rank
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = self.snippets = self.tokens = 0
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor], snippets: int, tokens: int) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1
        self.snippets += snippets
        self.tokens += tokens

    def flush(self, progress: Progress, epoch: int, total: int, budget_s: float | None) -> dict:
        names = sorted(self.sums)
        totals = torch.stack([self.sums[n] for n in names])
        torch_dist.all_reduce(totals)
        losses = {n: float(v) / self.steps for n, v in zip(names, totals.cpu())}
        seconds = max(time.perf_counter() - self.start, 1e-9)
        point = {"step": progress.step, "epoch": epoch, **losses}
        progress.history.loss_curve.append(point)
        report = {
            **point,
            "snippets_per_s": self.snippets / seconds,
            "tokens_per_s": self.tokens / seconds,
            "elapsed_s": progress.history.seconds,
            "eta_s": eta_seconds(seconds / self.steps, total - progress.step, budget_s, progress.history.seconds),
        }
        if self.rank == 0:
            log.info(
                "step %d/%d epoch %d loss %.5f | %.1f snippets/s %.0f tokens/s | elapsed %.0fs eta %.0fs",
                progress.step, total, epoch, losses["loss"], report["snippets_per_s"], report["tokens_per_s"],
                report["elapsed_s"], report["eta_s"],
            )
        self._reset()
        return report


def _save_checkpoint(parallel, progress: Progress, rows: dict[str, torch.Tensor], rank: int, report: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="tokdist-ckpt-") as tmp:
        directory = Path(tmp)
        parallel.save(directory / OPTIMIZER_DIR, rank)
        save_rng(directory, rank)
        if rank == 0:
            write_progress(directory, progress)
            write_rows(directory / ROWS, rows)
        ray.train.report(
            report, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=checkpoint_name(progress.step)
        )


def _restore(parallel, rank: int) -> tuple[Progress, dict[str, torch.Tensor] | None]:
    """(progress, rows) from the latest checkpoint, or a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress(), None
    with checkpoint.as_directory() as tmp:
        directory = Path(tmp)
        progress = read_progress(directory)
        rows = read_rows(directory / ROWS)
        parallel.load(directory / OPTIMIZER_DIR, rows)
        restore_rng(directory, rank)
    progress.resumed_from.append(progress.step)
    if rank == 0:
        log.info("resumed from the checkpoint at step %d", progress.step)
    return progress, rows


def _maybe_crash(step: int, rank: int) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    at, who, marker = spec.split(":", 2)
    if step == int(at) and rank == int(who):
        try:
            open(marker, "x").close()
        except FileExistsError:
            return
        import ray.train

        # die only once Ray has committed the reported checkpoints, so the test knows
        # which one the restart must continue from
        ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED)
        os._exit(1)


def _export(plan: WorkerPlan, rows: dict[str, torch.Tensor], progress: Progress, counts: dict[str, int]) -> None:
    """Expand a fresh copy of the model (its old rows straight from disk) and save it."""
    tokenizer = load_tokenizer(plan.model_path)
    new_start = len(tokenizer)
    model = load_model(plan.model_path, dtype="auto")
    expand_model(model, new_start, rows["input"], rows.get("output"))
    report = {
        "model": plan.model_name,
        "tokens_added": [
            {"token": t.text, "id": new_start + i, "phrase_ids": list(t.phrase_ids), "snippets": counts.get(t.text, 0)}
            for i, t in enumerate(plan.tokens)
        ],
        "training": progress.history.as_dict(),
        "distributed": {
            "strategy": plan.strategy,
            "zero_stage": plan.zero_stage,
            "num_workers": plan.num_workers,
            "per_worker_batch": plan.training.batch_size,
            "global_batch": plan.global_training.batch_size,
            "resumed_from_steps": progress.resumed_from,
            "checkpoints": plan.storage,
        },
        "settings": {
            "output_emb_policy": plan.output_emb_policy.value,
            "pre_init_strategy": plan.pre_init_strategy,
            "training": dict(vars(plan.training)),
        },
    }
    out = save_expanded(model, expand_tokenizer(tokenizer, plan.tokens), plan.out_dir, report)
    write_rows(out / ROWS, rows)
    log.info("saved the expanded model to %s", out)
