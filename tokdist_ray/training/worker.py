"""The per-worker training loop of a Ray Train run (TorchTrainer's train_loop_per_worker).

Every worker runs the engine's step (step.TokenDistiller) on its slice of each global
batch (schedule.SnippetSchedule). Each worker's loss is weighted by its share of the
global batch's loss positions before the strategy averages gradients, so a step equals
the single-process step on the whole global batch. Checkpoints go to Ray's storage every
`checkpoint_every` steps and at the end; a restarted worker group continues from the
latest one. Rank 0 exports the expanded model and writes report.json.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist

from tokdist_ray.console import quiet_worker
from tokdist_ray.errors import TooFewSnippetsError
from tokdist_ray.report import expansion_report, positions_per_token
from tokdist_ray.training.batching import align_snippets, collate
from tokdist_ray.training.checkpoint import (
    OPTIMIZER_DIR,
    ROWS,
    Progress,
    check_finite,
    checkpoint_name,
    read_progress,
    read_rows,
    restore_rng,
    save_rng,
    write_progress,
    write_rows,
)
from tokdist_ray.training.progress import ProgressMeter
from tokdist_ray.training.rows import initial_rows
from tokdist_ray.training.schedule import SnippetSchedule, make_optimizer
from tokdist_ray.training.snippet_files import SnippetSet, read_snippets
from tokdist_ray.training.step import TokenDistiller, bf16_supported
from tokdist_ray.training.strategies import DataParallel, DeepSpeedZero, deepspeed_config, model_dtype
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.expansion_files import expansion_summary
from tokdist_ray.vocab.export import expand_model, save_expanded
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
    if not snippets.ids:
        raise TooFewSnippetsError(f"no snippets of the {len(plan.distilled)} new tokens under {plan.snippets_path}")
    new_start = plan.expansion.new_start
    schedule = SnippetSchedule.for_run(snippets.ids, new_start, cfg)
    steps = schedule.total_steps(cfg)
    aligner = PieceAligner.for_tokens(plan.tokens, new_start)
    parallel = _parallel_distiller(plan, new_start, steps, world, device)

    progress, rows = _restore(parallel, rank)  # rows: None until a checkpoint holds them
    # Ray gets metrics with each checkpoint only: every ray.train.report waits until the
    # controller (polling every few seconds) took the previous one, so a report per log
    # interval would stall fast steps. Progress lines and the loss curve need no Ray.
    meter = ProgressMeter(steps, cfg.time_budget_s, reduce=torch_dist.all_reduce, prints=rank == 0)
    started = time.perf_counter() - progress.history.seconds
    while progress.step < steps:
        indices = schedule.rank_indices(progress.step, rank, world)
        global_batch = schedule.global_indices(progress.step)
        # a rank without snippets in a short batch still joins the gradient average,
        # with a zero-weighted loss on a borrowed snippet
        examples = align_snippets(aligner, [snippets.ids[i] for i in (indices or global_batch[:1])])
        metrics = _train_step(parallel, collate(examples), world, has_snippets=bool(indices), device=device)
        history = progress.history
        progress.step = history.steps = progress.step + 1
        history.snippets += len(global_batch)
        history.seconds = time.perf_counter() - started
        meter.add(metrics, len(global_batch), sum(len(snippets.ids[i]) for i in global_batch))
        over_budget = bool(cfg.time_budget_s) and _any_rank(history.seconds >= cfg.time_budget_s, device)
        stop = schedule.stop_reason(progress.step, cfg, over_budget)
        history.stopped_by = stop or history.stopped_by
        if plan.after_step is not None:
            plan.after_step(progress.step, rank)

        at_checkpoint = stop or (plan.checkpoint_every and progress.step % plan.checkpoint_every == 0)
        if at_checkpoint or progress.step % max(1, cfg.log_every) == 0:
            report = meter.flush(progress.step, schedule.position(progress.step - 1)[0], history)
        if at_checkpoint:
            rows = parallel.full_rows()
            check_finite(rows, progress.step)
            _save_checkpoint(parallel, progress, rows, rank, report)
        if stop:
            break
    if rank == 0:
        del parallel
        _export(plan, rows, progress, snippets)


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _parallel_distiller(plan, new_start: int, steps: int, world: int, device: torch.device):
    dtype = model_dtype(plan.use_gpu, plan.training.mixed_precision, gpu_runs_bf16=bf16_supported(device))
    model = load_model(plan.model_path, dtype=dtype, device=device)
    rows = initial_rows(model, [t.phrase_ids for t in plan.tokens], plan.output_emb_policy, plan.pre_init_strategy,
                        plan.training.untie_word_embeddings)
    cfg = plan.training
    distiller = TokenDistiller.from_config(model, rows, new_start, cfg).to(device)
    optimizer, lr_schedule = make_optimizer([p for p in distiller.parameters() if p.requires_grad], cfg, steps)
    if plan.strategy == "ddp":
        return DataParallel(distiller, optimizer, lr_schedule, device)
    config = deepspeed_config(plan.zero_stage, cfg.batch_size, world, dtype == torch.bfloat16, plan.deepspeed_overrides)
    return DeepSpeedZero(distiller, optimizer, lr_schedule, config)


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


def _export(plan, rows: dict[str, torch.Tensor], progress: Progress, snippets: SnippetSet) -> None:
    """Expand a fresh copy of the model (its old rows straight from disk) and save it."""
    new_start = plan.expansion.new_start
    model = load_model(plan.model_path, dtype="auto")
    expand_model(model, new_start, rows["input"], rows.get("output"))
    report = expansion_report(
        plan.model_name, plan.tokens, new_start, snippets.counts, progress.history,
        settings={"output_emb_policy": plan.output_emb_policy.value, "pre_init_strategy": plan.pre_init_strategy,
                  "training": dict(vars(plan.training))},
        positions=positions_per_token(snippets.ids, new_start, len(plan.tokens)),
        tokenizer=expansion_summary(plan.expansion),
        distributed={
            "strategy": plan.strategy,
            "zero_stage": plan.zero_stage,
            "num_workers": plan.num_workers,
            "per_worker_batch": plan.training.batch_size,
            "global_batch": plan.global_training.batch_size,
            "resumed_from_steps": progress.resumed_from,
        },
    )
    out = save_expanded(model, plan.expansion.tokenizer, plan.out_dir, report)
    write_rows(out / ROWS, rows)
    log.info("saved the expanded model to %s", out)
