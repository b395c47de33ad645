"""Distributed distillation on Ray Train: the driver.

    expansion = expand_with_merges(load_tokenizer("bundled:smollm2"), [" Krankenwagen", ...])
    run = distill_distributed(
        "bundled:smollm2", "snippets/", expansion, "rows/",
        training=DistillationConfig(batch_size=8),            # per worker
        dist=DistributedConfig(num_workers=4, use_gpu=True, strategy="auto", checkpoint_every=200),
    )
    read_distilled(run.rows_dir).rows["input"]             # the new input rows

The driver validates the arguments, picks the strategy (strategies.choose_strategy),
claims the run in checkpoint storage (run_manifest), and starts a TorchTrainer whose
workers run worker.train_worker. Rank 0 writes the rows and their record to `rows_dir`
(distilled_rows.py); Ray's `Result.metrics` is not relied on. The export is a stage of
its own (export.model.save_model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pyarrow.fs

from tokdist_ray.capacity import Capacity, cluster_capacity, free_cpus, wait_for_nodes
from tokdist_ray.config import (
    DistillationConfig,
    DistributedConfig,
    OutputEmbeddingInit,
)
from tokdist_ray.config import (
    output_emb_policy as checked_policy,
)
from tokdist_ray.config import (
    pre_init_strategy as checked_strategy,
)
from tokdist_ray.console import worker_env
from tokdist_ray.errors import user_error_in
from tokdist_ray.raycluster import connect
from tokdist_ray.storage import absolute
from tokdist_ray.training.distilled_rows import TRAINING_RECORD
from tokdist_ray.training.fit_hook import OutputFit
from tokdist_ray.training.losses import check_methods
from tokdist_ray.training.run_manifest import RunDirectory, manifest
from tokdist_ray.training.strategies import choose_strategy
from tokdist_ray.training.worker import train_worker
from tokdist_ray.vocab.merges import MergeExpansion
from tokdist_ray.vocab.models import resolve_model_path

log = logging.getLogger("tokdist_ray")


@dataclass
class DistilledRun:
    rows_dir: Path  # distilled_rows.py: the rows, training.json, and the fitted rows with an output fit
    record: dict  # training.json
    fitted: bool  # the output fit ran on the workers: fitted_rows.safetensors, output_fit.json
    checkpoint_path: str | None  # the final checkpoint in storage


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs, checked on the driver."""

    # as the user gave it: each worker resolves it on its own node (vocab.models.load_model),
    # where a bundled or GGUF model materialises; the driver's copy is on the driver's node
    model_path: str
    snippets_path: str
    snippets_filesystem: pyarrow.fs.FileSystem | None
    expansion: MergeExpansion  # every new id gets a row; shipped by value, rank 0 exports its tokenizer
    distilled: tuple[str, ...]  # the tokens whose snippets are trained on (the others keep their initial rows)
    rows_dir: str  # rank 0 writes the rows here (distilled_rows.py)
    training: DistillationConfig  # batch_size per worker
    num_workers: int
    use_gpu: bool
    strategy: str  # "ddp" | "deepspeed"
    zero_stage: int | None
    deepspeed_overrides: dict | None
    checkpoint_every: int
    checkpoint_every_s: float | None
    checkpoint_upload: str  # "async" | "sync"
    storage: str
    output_emb_policy: OutputEmbeddingInit
    pre_init_strategy: str
    after_step: Callable[[int, int], None] | None = None
    output_fit: OutputFit | None = None  # run on the workers after training

    @property
    def tokens(self):
        return self.expansion.tokens

    @property
    def global_training(self) -> DistillationConfig:
        """The config the single-process loop would run with: the global batch."""
        return dataclasses.replace(self.training, batch_size=self.training.batch_size * self.num_workers)


def distill_distributed(
    model_path: str,
    snippets_path: str,
    expansion: MergeExpansion,
    rows_dir: str | Path,
    training: DistillationConfig = DistillationConfig(),
    dist: DistributedConfig = DistributedConfig(),
    output_emb_policy: OutputEmbeddingInit | str = OutputEmbeddingInit.FIRST_PIECE,
    pre_init_strategy: str = "fvt",
    *,
    distilled: Sequence[str] | None = None,
    snippets_filesystem: pyarrow.fs.FileSystem | None = None,
    after_step: Callable[[int, int], None] | None = None,
    snippet_len: int = 50,
    output_fit: OutputFit | None = None,
) -> DistilledRun:
    """Learn the rows of the new ids of `expansion` (vocab.merges.expand_with_merges) on
    `dist.num_workers` Ray Train workers from the snippet parquet at `snippets_path`
    (data.snippets.SNIPPET_SCHEMA, in the expanded tokenizer's ids); rank 0 writes them
    with their record to `rows_dir` (a path rank 0 can write: local, or a shared
    filesystem on a cluster). Only the snippets of the `distilled` tokens (default: all)
    are trained on; the others keep their pre-initialised rows.

    `after_step(step, rank)`, if given, runs on every worker after each optimizer step
    (custom monitoring; fault injection in tests). `snippet_len` sizes the activations
    `strategy="auto"` plans for. With `output_fit` (fit_hook.OutputFit), the workers then
    fit the new output rows on its text. Uses the running Ray instance, or starts a local
    one.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    plan = _plan(model_path, snippets_path, expansion, distilled, rows_dir, training, dist, output_emb_policy,
                 pre_init_strategy, snippets_filesystem, after_step)
    plan = dataclasses.replace(plan, output_fit=output_fit)
    connect()
    capacity = cluster_capacity()
    dist = _with_cpus(dist, capacity)
    _wait_for_workers(dist, capacity)
    strategy, zero_stage = choose_strategy(dist, resolve_model_path(plan.model_path), training, len(plan.tokens),
                                           snippet_len + 1, plan.output_emb_policy)
    plan = dataclasses.replace(plan, strategy=strategy, zero_stage=zero_stage)
    log.info(
        "distributed distillation: %d tokens, %d workers of %g CPUs, %s%s, global batch %d",
        len(plan.tokens), plan.num_workers, dist.cpus_per_worker, plan.strategy,
        f" ZeRO-{plan.zero_stage}" if plan.zero_stage else "", plan.global_training.batch_size,
    )
    run = RunDirectory(plan.storage, dist.run_name, dist.storage_filesystem)
    run.claim(manifest(plan), dist.resume)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"plan": plan},
        torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=dist.num_workers, use_gpu=dist.use_gpu,
            resources_per_worker={"CPU": dist.cpus_per_worker, **({"GPU": 1} if dist.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=dist.run_name,
            storage_path=plan.storage,
            storage_filesystem=dist.storage_filesystem,
            failure_config=FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=dist.keep_checkpoints),
            worker_runtime_env={"env_vars": {**worker_env(), **({} if dist.use_gpu else {"DS_ACCELERATOR": "cpu"})}},
            **_quiet_train_logs(ray.train),
        ),
    )
    try:
        result = _fit(trainer)
    except Exception as e:  # a user error raised in a worker (a diverged run) reaches the user as itself
        if (user_error := user_error_in(e)) is not None:
            raise user_error from None
        raise
    rows = Path(plan.rows_dir)
    run.mark_finished(str(rows))
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return DistilledRun(rows, json.loads((rows / TRAINING_RECORD).read_text()), output_fit is not None, checkpoint)


def _with_cpus(dist: DistributedConfig, capacity: Capacity) -> DistributedConfig:
    """`cpus_per_worker` "auto" made a number (config.DistributedConfig): 1 with GPUs or an
    autoscaler (a worker that asks for a whole node waits for ever once anything else holds
    a CPU there and the cluster is at its size); else the most at which the nodes up hold
    every worker, no more than the CPUs free now allow (capacity.free_cpus)."""
    if dist.cpus_per_worker != "auto":
        return dist
    if dist.use_gpu or capacity.node_types or capacity.unseen_autoscaler:
        return dataclasses.replace(dist, cpus_per_worker=1)
    cpus = capacity.cpus_per_cpu_worker(dist.num_workers)
    cpus = max(1, min(cpus, int(free_cpus(capacity, cpus * dist.num_workers)) // dist.num_workers))
    return dataclasses.replace(dist, cpus_per_worker=cpus)


def _wait_for_workers(dist: DistributedConfig, capacity: Capacity) -> None:
    """Ray Train waits for its workers' resources for ever: ask an autoscaler for them here,
    refuse in one line what no node type holds, and say so once when the cluster, grown as
    far as it can, holds fewer workers than asked for. (A local run was checked before.)"""
    bundle = {"CPU": dist.cpus_per_worker, **({"GPU": 1} if dist.use_gpu else {})}
    wait_for_nodes("distillation", bundle, dist.num_workers, capacity, setting="distributed.cpus_per_worker")
    room = capacity.gpu_replicas() if dist.use_gpu else capacity.cpu_workers(dist.cpus_per_worker)
    if room < dist.num_workers:
        log.warning("the cluster holds %d of the %d distillation workers of %s, even grown as far as it can; Ray Train "
                    "waits for them: lower distributed.num_workers", room, dist.num_workers, bundle)


def _fit(trainer):
    """trainer.fit() in a helper thread. On the main thread Ray Train installs a SIGINT
    handler that it never removes, so a Ctrl-C after training (while evaluating) exited 1
    with no message. Here Ctrl-C stays a KeyboardInterrupt of this process, whose exit
    ends the run's actors; its checkpoints stay for a resumed run."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # handed to the caller's thread below
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # a bare join() would hold off KeyboardInterrupt
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _quiet_train_logs(train) -> dict:
    """Ray Train's worker-group notices off the console (Ray >= 2.60; they stay in its logs)."""
    config = getattr(train, "LoggingConfig", None)
    return {"logging_config": config(log_level="WARNING")} if config is not None else {}


def _plan(model_path, snippets_path, expansion, distilled, rows_dir, training, dist, output_emb_policy,
          pre_init_strategy, snippets_fs, after_step) -> WorkerPlan:
    """Validate the arguments up front, before any worker starts."""
    if not isinstance(training, DistillationConfig):
        raise TypeError(f"training must be a DistillationConfig, not {type(training).__name__}")
    if not isinstance(dist, DistributedConfig):
        raise TypeError(f"dist must be a DistributedConfig, not {type(dist).__name__}")
    check_methods(training.loss_methods)
    if not isinstance(expansion, MergeExpansion) or not expansion.tokens:
        raise ValueError("expansion must be a MergeExpansion with new tokens (see vocab.merges.expand_with_merges)")
    texts = [t.text for t in expansion.tokens]
    distilled = tuple(texts if distilled is None else distilled)
    if not set(distilled) <= set(texts):
        raise ValueError(f"distilled tokens not in the expansion: {sorted(set(distilled) - set(texts))[:5]}")
    out = Path(rows_dir).expanduser().resolve()
    storage = dist.storage_path or str(out.parent / f"{out.name}.checkpoints")
    if dist.storage_filesystem is None:
        storage = absolute(storage)
    # Ray Train starts workers in their own artifacts directory: relative paths would miss.
    if snippets_fs is None:
        snippets_path = absolute(snippets_path)
    resolve_model_path(model_path)  # a name that names no model fails here, before any worker starts
    if Path(model_path).expanduser().exists():
        model_path = absolute(model_path)
    return WorkerPlan(
        model_path=model_path, snippets_path=snippets_path,
        snippets_filesystem=snippets_fs, expansion=expansion, distilled=distilled, rows_dir=str(out), training=training,
        num_workers=dist.num_workers, use_gpu=dist.use_gpu, strategy=dist.strategy, zero_stage=dist.zero_stage,
        deepspeed_overrides=dist.deepspeed_config, checkpoint_every=dist.checkpoint_every,
        checkpoint_every_s=dist.checkpoint_every_s, checkpoint_upload=dist.checkpoint_upload, storage=storage,
        output_emb_policy=checked_policy(output_emb_policy), pre_init_strategy=checked_strategy(pre_init_strategy),
        after_step=after_step,
    )
