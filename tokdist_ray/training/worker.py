"""A Ray Train worker (TorchTrainer's train_loop_per_worker): reads the snippets, builds
its strategy, runs the training loop (loop.py) on its slice of every global batch, and
saves checkpoints to Ray's storage every `checkpoint_every` steps or `checkpoint_every_s`
seconds and at the end (each rank its share, written in the background: checkpoint.py),
from which a restarted worker group continues. With the pipeline's output fit
(fit_hook.OutputFit), the workers then fit the new output rows on the model they hold.
Rank 0 writes the rows and their record to the plan's rows_dir (distilled_rows.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as torch_dist

from tokdist_ray.console import quiet_worker
from tokdist_ray.errors import TooFewSnippetsError
from tokdist_ray.raycluster import node_id
from tokdist_ray.training.checkpoint import Checkpointer, Progress, checkpoint_name, read_checkpoint
from tokdist_ray.training.distilled_rows import (
    DistilledRows,
    positions_per_token,
    training_record,
    write_distilled,
    write_fitted,
)
from tokdist_ray.training.loop import SnippetIds, train_loop
from tokdist_ray.training.rows import initial_rows
from tokdist_ray.training.schedule import SnippetSchedule, make_optimizer
from tokdist_ray.training.snippet_files import SnippetSet, read_snippets
from tokdist_ray.training.step import TokenDistiller, bf16_supported
from tokdist_ray.training.strategies import DataParallel, DeepSpeedZero, deepspeed_config, model_dtype
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.models import load_model

log = logging.getLogger("tokdist_ray")


def train_worker(config: dict) -> None:
    import ray.train

    quiet_worker()
    plan = config["plan"]  # ray_trainer.WorkerPlan
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg = plan.global_training
    torch.manual_seed(cfg.seed)
    device = _device(plan.use_gpu)

    snippets = read_snippets(plan.snippets_path, plan.distilled, plan.snippets_filesystem)
    if not len(snippets.ids):
        raise TooFewSnippetsError(f"no snippets of the {len(plan.distilled)} new tokens under {plan.snippets_path}")
    new_start = plan.expansion.new_start
    schedule = SnippetSchedule.for_run(snippets.ids, new_start, cfg)
    steps = schedule.total_steps(cfg)
    aligner = PieceAligner.for_tokens(plan.tokens, new_start)
    parallel = parallel_distiller(plan, new_start, steps, world, device)
    held = weights_held_share(parallel.distiller.model)

    progress, rows = _restore(parallel, rank)  # rows: None until a checkpoint holds them
    # Ray gets metrics with each checkpoint only: every ray.train.report waits until the
    # controller (polling every few seconds) took the previous one, so a report per log
    # interval would stall fast steps. Progress lines and the loss curve need no Ray.
    checkpoints = Checkpointer(parallel, rank, world, _report, in_background=plan.checkpoint_upload == "async")
    try:
        progress, final_rows = train_loop(
            parallel, SnippetIds(snippets.ids, aligner), schedule, cfg, progress, rank=rank, world=world,
            checkpoint_every=plan.checkpoint_every, checkpoint_every_s=plan.checkpoint_every_s,
            after_step=_polling(checkpoints, plan.after_step), save_checkpoint=checkpoints.save,
        )
    finally:
        checkpoints.close()
    trained, fitted = final_rows if final_rows is not None else rows, None
    if plan.output_fit is not None:
        model = parallel.distiller.model
        with _gathered_tables(model, held < 1):
            windows = snippets.corpus_windows(plan.output_fit.settings.snippets_per_token)
            fitted = plan.output_fit(model, trained, plan.expansion, cfg, windows, rank, world, parallel.all_reduce)
    ranks = [None] * world  # where each rank ran and the share of the weights it held, for the report
    torch_dist.all_gather_object(ranks, {"node": node_id(), "weights_held": round(held, 4)})
    if rank == 0:
        rows_dir = Path(plan.rows_dir)
        write_distilled(rows_dir, DistilledRows(trained, _record(plan, progress, snippets, ranks)))
        if fitted is not None:
            write_fitted(rows_dir, fitted)


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def parallel_distiller(plan, new_start: int, steps: int, world: int, device: torch.device):
    """The plan's model, new rows and optimizer under its strategy (DDP or DeepSpeed ZeRO),
    in the process group that is up (Ray Train's, or bench/gpu_check.py's without Ray)."""
    dtype = model_dtype(plan.use_gpu, plan.training.mixed_precision, gpu_runs_bf16=bf16_supported(device))
    cfg = plan.training
    config = None if plan.strategy == "ddp" else deepspeed_config(
        plan.zero_stage, cfg.batch_size, world, plan.deepspeed_overrides)
    sharded = config is not None and config["zero_optimization"]["stage"] == 3
    zero3 = _zero3_load(config, dtype) if sharded else None  # alive until the engine exists
    model = load_model(plan.model_path, dtype=dtype, device=device)
    with _gathered_tables(model, sharded):
        rows = initial_rows(model, [t.phrase_ids for t in plan.tokens], plan.output_emb_policy,
                            plan.pre_init_strategy, cfg.untie_word_embeddings)
    distiller = TokenDistiller.from_config(model, rows, new_start, cfg).to(device)
    optimizer, lr_schedule = make_optimizer([p for p in distiller.parameters() if p.requires_grad], cfg, steps)
    if config is None:
        return DataParallel(distiller, optimizer, lr_schedule, device)
    parallel = DeepSpeedZero(distiller, optimizer, lr_schedule, config, device)
    del zero3
    return parallel


def _zero3_load(config: dict, dtype: torch.dtype):
    """While the returned object lives, from_pretrained partitions each weight as it loads
    it (deepspeed.zero.Init through transformers): a worker never holds the whole model."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed()  # joins Ray Train's process group, so the config sees every worker
    # zero.Init partitions the weights in the dtype of its config's precision mode, fp32 with
    # bf16 off (as the engine's is: strategies.deepspeed_config), whatever from_pretrained is
    # asked for. Naming bf16 here keeps bf16 weights bf16; the engine never sees this copy.
    return HfDeepSpeedConfig({**config, "bf16": {"enabled": dtype == torch.bfloat16}})


def _gathered_tables(model, sharded: bool):
    """The embedding tables whole, for reading the initial rows of the new tokens."""
    import contextlib

    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    tables = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not tables[0]:
        tables.append(head.weight)
    return deepspeed.zero.GatheredParameters(tables, modifier_rank=None)


def weights_held_share(model) -> float:
    """The share of the frozen model's weights this worker holds (ZeRO-3: its partition)."""
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return held / full


def _polling(checkpoints: Checkpointer, after_step: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
    """The loop's after_step: publish a checkpoint written in the background, then the plan's hook."""
    def after(step: int, rank: int) -> None:
        checkpoints.poll()
        if after_step is not None:
            after_step(step, rank)

    return after


def _report(directory: Path, step: int, metrics: dict, wait: bool) -> None:
    """Hand this rank's written part of a checkpoint to Ray Train, which merges every rank's
    files into one directory in storage and deletes the local copy once uploaded: while
    training goes on, or, with `wait`, before it does (the last one, which the export
    follows). Every rank calls it at the same step (Checkpointer): a barrier in Ray Train."""
    import ray.train

    mode = ray.train.CheckpointUploadMode.SYNC if wait else ray.train.CheckpointUploadMode.ASYNC
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                     checkpoint_dir_name=checkpoint_name(step), checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True)


def _restore(parallel, rank: int) -> tuple[Progress, dict[str, torch.Tensor] | None]:
    """(progress, rows) from the latest checkpoint, or a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress(), None
    with checkpoint.as_directory() as directory:
        progress, rows = read_checkpoint(Path(directory), parallel, rank)
    if rank == 0:
        log.info("resumed from the checkpoint at step %d", progress.step)
    return progress, rows


def _record(plan, progress: Progress, snippets: SnippetSet, ranks: list[dict]) -> dict:
    """training.json: the history, what trained each token, and where each rank ran."""
    return training_record(
        progress.history.as_dict(), snippets.counts,
        positions_per_token(snippets.ids, plan.expansion.new_start, len(plan.tokens)),
        distributed={
            "strategy": plan.strategy,
            "zero_stage": plan.zero_stage,
            "num_workers": plan.num_workers,
            "per_worker_batch": plan.training.batch_size,
            "global_batch": plan.global_training.batch_size,
            "resumed_from_steps": progress.resumed_from,
            "nodes": [r["node"] for r in ranks],  # per rank
            "weights_held": [r["weights_held"] for r in ranks],  # per rank: share of the frozen model's weights
        },
    )
