"""Data-parallel wrappers around a TokenDistiller: DDP, or DeepSpeed ZeRO stage 1-3.

Both average the new rows' gradients over workers, step the optimizer and schedule from
`loop.make_optimizer`, hand back the whole fp32 new rows, and save/load their optimizer
state into a checkpoint directory. Only the new rows train, so gradients, optimizer
state and all-reduce traffic are O(n_new x d) in every strategy; ZeRO-3 additionally
shards the frozen model's weights over the workers.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from tokdist_ray.training.step import TokenDistiller, truncated_decoder


class DataParallel:
    """torch DDP: each worker holds the whole frozen model; only the new rows' gradient
    crosses the network."""

    name = "ddp"

    def __init__(self, distiller: TokenDistiller, optimizer, schedule, device: torch.device):
        from torch.nn.parallel import DistributedDataParallel

        self.distiller, self.optimizer, self.schedule = distiller, optimizer, schedule
        # Every worker loads the same weights: skip DDP's start-up broadcast of the frozen model.
        distiller._ddp_params_and_buffers_to_ignore = [
            n for n, p in distiller.named_parameters() if not p.requires_grad
        ] + [n for n, _ in distiller.named_buffers()]
        self.module = DistributedDataParallel(
            distiller, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )

    def __call__(self, batch: dict) -> dict:
        return self.module(batch)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def full_rows(self) -> dict[str, torch.Tensor]:
        return _rows_of(self.distiller)

    def save(self, directory: Path, rank: int) -> None:
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()},
                directory / "optimizer.pt",
            )

    @torch.no_grad()
    def load(self, directory: Path, rows: dict[str, torch.Tensor]) -> None:
        for name, value in rows.items():
            getattr(self.distiller.rows, name).copy_(value)
        state = torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu")
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])


class DeepSpeedZero:
    """DeepSpeed ZeRO stage 1-3 over the new rows; stage 3 also shards the frozen weights."""

    name = "deepspeed"
    _TAG = "state"

    def __init__(self, distiller: TokenDistiller, optimizer, schedule, config: dict):
        import deepspeed

        self.distiller = distiller
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

    def save(self, directory: Path, rank: int) -> None:
        # collective: every rank writes its own optimizer shard; the frozen model is left out
        self.engine.save_checkpoint(str(directory), tag=self._TAG, exclude_frozen_parameters=True)

    def load(self, directory: Path, rows: dict[str, torch.Tensor]) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=self._TAG, load_module_strict=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {directory}")


def deepspeed_config(stage: int, micro_batch: int, world: int, bf16: bool, overrides: dict | None) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW from loop.make_optimizer
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told; the engine's loop never clips
        "steps_per_print": 1 << 30,
    }
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
