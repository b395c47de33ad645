"""The strategies the training loop (loop.py) runs a TokenDistiller under: Local (one
process, the API's), DDP, or DeepSpeed ZeRO stage 1-3; and how `strategy="auto"` picks one.

The distributed two average the new rows' gradients over workers, step the optimizer and schedule from
`schedule.make_optimizer`, hand back the whole fp32 new rows, and save/load their optimizer
state into a checkpoint directory. Only the new rows train, so gradients, optimizer
state and all-reduce traffic are O(n_new x d) in every strategy; DDP sends only the rows
some worker's batch touched (sparse_exchange.py); ZeRO-3 additionally shards the frozen
model's weights over the workers.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed

from tokdist_ray.config import check_deepspeed_overrides
from tokdist_ray.training.checkpoint import (
    MOMENTS,
    cpu_copies,
    join_optimizer_state,
    read_slices,
    slice_of,
    split_optimizer_state,
    write_slice,
)
from tokdist_ray.training.losses import LOGITS, needed
from tokdist_ray.training.sparse_exchange import sparse_rows_hook
from tokdist_ray.training.step import TokenDistiller, truncated_decoder

log = logging.getLogger("tokdist_ray")


class Local:
    """One process: the loop's collectives are no-ops."""

    name = "local"

    def __init__(self, distiller: TokenDistiller, optimizer, schedule):
        self.distiller, self.optimizer, self.schedule = distiller, optimizer, schedule
        self.device = distiller.rows.input.device

    def __call__(self, batch: dict) -> dict:
        return self.distiller(batch)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        pass

    def backward_and_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def full_rows(self) -> dict[str, torch.Tensor]:
        return _rows_of(self.distiller)


class DataParallel(Local):
    """torch DDP: each worker holds the whole frozen model; only the new rows' gradient
    crosses the network, and of it only the rows some worker's batch touched."""

    name = "ddp"

    def __init__(self, distiller: TokenDistiller, optimizer, schedule, device: torch.device):
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(distiller, optimizer, schedule)
        self.device = device
        # Every worker loads the same weights: skip DDP's start-up broadcast of the frozen model.
        distiller._ddp_params_and_buffers_to_ignore = [
            n for n, p in distiller.named_parameters() if not p.requires_grad
        ] + [n for n, _ in distiller.named_buffers()]
        self.module = DistributedDataParallel(
            distiller, device_ids=[device.index] if device.type == "cuda" else None, **_no_buffer_sync(DistributedDataParallel)
        )
        self.module.register_comm_hook(None, sparse_rows_hook)

    def __call__(self, batch: dict) -> dict:
        return self.module(batch)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        torch.distributed.all_reduce(tensor)

    def save(self, directory: Path, rank: int, world: int) -> Callable[[], None]:
        """Copies, now, of this rank's share of the optimizer state; returned, the writer of its
        files (for any thread). Every rank holds the whole state under DDP, so each writes a
        slice of the per-row moments, and rank 0 the small rest (step counts, hyperparameters
        and the schedule's state) to optimizer.pt."""
        moments, rest = split_optimizer_state(self.optimizer.state_dict())
        share = cpu_copies(slice_of(moments, rank, world))  # AdamW updates its moments in place
        small = {"optimizer": rest, "schedule": copy.deepcopy(self.schedule.state_dict())} if rank == 0 else None

        def write() -> None:
            write_slice(directory, MOMENTS, share, rank, world)
            if small is not None:
                torch.save(small, directory / "optimizer.pt")

        return write

    @torch.no_grad()
    def load(self, directory: Path, rows: dict[str, torch.Tensor]) -> None:
        """The rows and the optimizer state, its moments joined from every rank's slices."""
        for name, value in rows.items():
            getattr(self.distiller.rows, name).copy_(value)
        state = torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu")
        self.optimizer.load_state_dict(join_optimizer_state(state["optimizer"], read_slices(directory, MOMENTS)))
        self.schedule.load_state_dict(state["schedule"])


def _no_buffer_sync(ddp) -> dict:
    """The frozen model's buffers never change: no per-step sync (the keyword was renamed in torch 2.13)."""
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class DeepSpeedZero:
    """DeepSpeed ZeRO stage 1-3 over the new rows; stage 3 also shards the frozen weights.
    The engine runs in fp32 (`deepspeed_config`): frozen weights in whatever dtype they were
    loaded in, rows, their gradients, master copy and AdamW moments in fp32."""

    name = "deepspeed"
    _TAG = "state"

    def __init__(self, distiller: TokenDistiller, optimizer, schedule, config: dict, device: torch.device):
        import deepspeed

        self.distiller, self.device = distiller, device
        self.stage = config["zero_optimization"]["stage"]
        # Under ZeRO-3 the new rows and the LM head are read outside their own modules'
        # forward; DeepSpeed gathers such parameters on access and ties them to the
        # module running then (TokenDistiller), so they need no registration here.
        trainable = [p for p in distiller.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(
            model=distiller, model_parameters=trainable, optimizer=optimizer, lr_scheduler=schedule, config=config
        )
        if self.stage == 3:
            _rebuild_target_view(distiller)

    def __call__(self, batch: dict) -> dict:
        return self.engine(batch)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        torch.distributed.all_reduce(tensor)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def full_rows(self) -> dict[str, torch.Tensor]:
        """The fp32 master rows; a collective under ZeRO-3, so every rank must call it."""
        from deepspeed.utils import safe_get_full_fp32_param

        rows = {}
        for name, param in _named_rows(self.distiller):
            full = safe_get_full_fp32_param(param) if param.requires_grad else None
            rows[name] = (full if full is not None else param.data).detach().float().cpu().clone()
        return rows

    def save(self, directory: Path, rank: int, world: int) -> Callable[[], None]:
        # collective: every rank writes its own optimizer shard, now, as DeepSpeed reads its
        # live partitioned state; the frozen model is left out
        self.engine.save_checkpoint(str(directory), tag=self._TAG, exclude_frozen_parameters=True)
        return lambda: None  # nothing left for the background thread

    def load(self, directory: Path, rows: dict[str, torch.Tensor]) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=self._TAG, load_module_strict=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {directory}")



def deepspeed_config(stage: int, micro_batch: int, world: int, overrides: dict | None) -> dict:
    """The engine's config, `overrides` merged over it.

    DeepSpeed's bf16 mode stays off whatever the weights' dtype. On, DeepSpeed 0.19 casts
    every parameter of the module to bf16 (the trainable new rows too, unless ZeRO-3
    partitioned the model at load), and reduces and accumulates gradients in bf16
    (`communication_data_type` and `data_types.grad_accum_dtype` follow the mode). Off, the
    engine takes the rows for the fp32 parameters they are: fp32 gradients, reductions,
    master copy and AdamW moments. The frozen weights are bf16 all the same where the model
    runs in bf16: loaded in bf16 (partitioned in bf16 under ZeRO-3: worker._zero3_load),
    with the step under autocast.
    """
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW from schedule.make_optimizer
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told; the engine's loop never clips
        "steps_per_print": 1 << 30,
    }
    check_deepspeed_overrides(overrides)
    return _deep_merge(config, overrides or {})


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _named_rows(distiller: TokenDistiller) -> list[tuple[str, torch.Tensor]]:
    rows = distiller.rows
    return [("input", rows.input)] + ([("output", rows.output)] if rows.output is not None else [])


def _rows_of(distiller: TokenDistiller) -> dict[str, torch.Tensor]:
    return {name: t.detach().float().cpu().clone() for name, t in _named_rows(distiller)}


def _rebuild_target_view(distiller: TokenDistiller) -> None:
    """The truncated decoder is a shallow copy made before DeepSpeed tagged the modules;
    copy it again so it carries ZeRO-3's per-module attributes."""
    decoder = distiller._decoder[0]
    distiller._target_decoder = [truncated_decoder(decoder, distiller.target)]


# ---------------------------------------------------------------------------- choosing one
# What a worker may plan to fill; the rest is left for the allocator, buffers and spikes.
USABLE_SHARE_OF_WORKER_MEMORY = 0.9
# Bytes per new-row element in training: fp32 master, gradient and AdamW's two moments.
ROW_TRAINING_BYTES = 16
# Activation bytes per token, layer and hidden unit kept for the backward pass of a
# decoder layer in 16-bit (Korthikanti et al. 2022, without attention scores: SDPA).
ACTIVATION_BYTES_PER_HIDDEN = 34


@dataclass(frozen=True)
class MemoryNeed:
    """What one worker holds during a step, in bytes."""

    weights: int  # the frozen model, whole (ZeRO-3 shards it over the workers)
    rows: int  # the new rows' training state (ZeRO-1/2/3 shard its gradient and moments)
    activations: int  # one step at the per-worker batch, to the target layer, and logits if a loss needs them

    @property
    def total(self) -> int:
        return self.weights + self.rows + self.activations

    def sharded(self, workers: int) -> int:
        """Under ZeRO-3: weights and row state split over the workers, activations not."""
        return (self.weights + self.rows) // workers + self.activations

    def describe(self, batch: int) -> str:
        gb = 2**30
        return (f"weights {self.weights / gb:.2f} GB + new-row training state {self.rows / gb:.2f} GB + "
                f"activations at batch {batch} {self.activations / gb:.2f} GB = {self.total / gb:.2f} GB")


def memory_need(model_path: str, dtype: torch.dtype, n_new: int, cfg, tokens_per_snippet: int,
                output_policy) -> MemoryNeed:
    """A worker's memory for a step at `cfg.batch_size` (per worker), counted from the
    model's config on the meta device (nothing is loaded)."""
    from transformers import AutoConfig

    from tokdist_ray.config import OutputEmbeddingInit

    full_config = AutoConfig.from_pretrained(model_path)
    config = full_config.get_text_config()
    layers, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    untied = not getattr(full_config, "tie_word_embeddings", False) or cfg.untie_word_embeddings
    trains_output_rows = untied and OutputEmbeddingInit(output_policy) is OutputEmbeddingInit.TRAIN_WITH_CE
    depth = cfg.target_layer % (layers + 1)
    tokens = cfg.batch_size * tokens_per_snippet
    scale = max(1, dtype.itemsize // 2)  # the per-token figure is for 16-bit activations
    activations = tokens * depth * hidden * ACTIVATION_BYTES_PER_HIDDEN * scale
    if LOGITS in needed(cfg.loss_methods) or trains_output_rows:
        activations += 3 * tokens * (vocab + n_new) * 4  # fp32 logits, student and teacher, and a softmax
        if dtype.itemsize < 4:  # output_side.head_logits multiplies in fp32: a copy of the head, kept for backward
            activations += vocab * hidden * 4
    rows = n_new * hidden * ROW_TRAINING_BYTES * (2 if trains_output_rows else 1)
    return MemoryNeed(model_bytes(model_path, dtype), rows, activations)


def model_dtype(use_gpu: bool, mixed_precision: bool, gpu_runs_bf16: bool) -> torch.dtype:
    """bf16 weights on GPUs that run bf16 under mixed precision; fp32 elsewhere (CPU
    autocast still computes in bf16 where the CPU supports it)."""
    return torch.bfloat16 if use_gpu and mixed_precision and gpu_runs_bf16 else torch.float32


def choose_strategy(dist, model_path: str, cfg, n_new: int, tokens_per_snippet: int,
                    output_policy) -> tuple[str, int | None]:
    """(strategy, ZeRO stage) to run; "auto" compares what a worker needs (weights, new-row
    training state, activations at the batch) with a worker's memory, and says so."""
    if dist.strategy == "ddp":
        return "ddp", None
    if dist.strategy == "deepspeed":
        return "deepspeed", dist.zero_stage or 3
    dtype = model_dtype(dist.use_gpu, cfg.mixed_precision, gpu_runs_bf16=True)
    need = memory_need(model_path, dtype, n_new, cfg, tokens_per_snippet, output_policy)
    have = int(dist.worker_memory_gb * 2**30) if dist.worker_memory_gb else probe_worker_memory(dist)
    choice = pick_strategy(need, have)
    log.info("strategy auto: a worker needs %s, of %.2f GB -> %s", need.describe(cfg.batch_size), have / 2**30,
             "DDP" if choice[0] == "ddp" else "DeepSpeed ZeRO-3")
    if choice[0] == "deepspeed" and need.sharded(dist.num_workers) > USABLE_SHARE_OF_WORKER_MEMORY * have:
        log.warning("even sharded over %d workers a worker needs %.2f GB of %.2f GB: add workers or lower "
                    "training.batch_size", dist.num_workers, need.sharded(dist.num_workers) / 2**30, have / 2**30)
    return choice


def pick_strategy(need: MemoryNeed, worker_bytes: int) -> tuple[str, int | None]:
    """DDP when a worker holds all it needs; ZeRO-3 otherwise."""
    if need.total <= USABLE_SHARE_OF_WORKER_MEMORY * worker_bytes:
        return "ddp", None
    return "deepspeed", 3


def model_bytes(model_path: str, dtype: torch.dtype) -> int:
    """Parameter count x dtype size, counted on the meta device (nothing is loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def probe_worker_memory(dist) -> int:
    """A GPU's memory, or on CPU a node's memory shared by the workers (all on one node, at worst)."""
    import os

    import ray

    @ray.remote(num_cpus=0, num_gpus=1 if dist.use_gpu else 0)
    def device_memory() -> int:
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    memory = ray.get(device_memory.remote())
    return memory if dist.use_gpu else memory // dist.num_workers
