"""A distillation run's manifest in checkpoint storage: what must not change when a
stopped run is resumed, and whether the run finished.

    <storage>/<run_name>/tokdist_run.json    settings of the run (written when it starts)
    <storage>/<run_name>/finished.json       written once the rows are written

Ray Train keeps its own record there too, the checkpoint manager's snapshot: which
checkpoints it registered, and so which one a resumed run starts from.
"""

from __future__ import annotations

import json
import logging

import pyarrow.fs

from tokdist_ray.errors import RunConflictError
from tokdist_ray.storage import location

MANIFEST = "tokdist_run.json"
FINISHED = "finished.json"
# training settings a resumed run may change: how often it logs, how long it may train on
NOT_IN_RUN_IDENTITY = ("log_every", "time_budget_s")
CHECKPOINT_PREFIX = "checkpoint_step_"  # + the step, 8 digits: the folders Ray Train writes checkpoints to
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's (ray.train.v2._internal.constants)

log = logging.getLogger("tokdist_ray")


def manifest(plan) -> dict:
    """The settings of a run (a WorkerPlan) that its resumption must share."""
    training = {k: v for k, v in vars(plan.training).items() if k not in NOT_IN_RUN_IDENTITY}
    return json.loads(json.dumps({
        "model": plan.model_path,
        "snippets": plan.snippets_path,
        "tokens": [[t.text, list(t.phrase_ids)] for t in plan.tokens],
        "training": training,
        "num_workers": plan.num_workers,
        "strategy": plan.strategy,
        "zero_stage": plan.zero_stage,
        "output_emb_policy": plan.output_emb_policy.value,
        "pre_init_strategy": plan.pre_init_strategy,
    }, default=list))


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ, e.g. ['training.learning_rate']."""
    old, new = _flat(saved), _flat(current)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


class RunDirectory:
    """One run's folder in checkpoint storage (local path or URI)."""

    def __init__(self, storage: str, run_name: str, filesystem: pyarrow.fs.FileSystem | None = None):
        self.fs, root = location(storage, filesystem)
        self.path = f"{root}/{run_name}"
        self.where = f"{storage}/{run_name}"

    def _exists(self, name: str) -> bool:
        return self.fs.get_file_info(f"{self.path}/{name}").type != pyarrow.fs.FileType.NotFound

    def _read(self, name: str) -> dict:
        with self.fs.open_input_stream(f"{self.path}/{name}") as f:
            return json.loads(f.read().decode("utf-8"))

    def _write(self, name: str, value: dict) -> None:
        """Written whole: to a temp file, then moved over `name` (a rename on local disks;
        object stores publish a file only when it is closed)."""
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(f"{self.path}/{name}.partial") as f:
            f.write(json.dumps(value, indent=2).encode("utf-8"))
        self.fs.move(f"{self.path}/{name}.partial", f"{self.path}/{name}")

    @property
    def state(self) -> str:
        """"new" (nothing there), "stopped" (started, not finished) or "finished"."""
        if not self._exists(MANIFEST):
            return "new"
        return "finished" if self._exists(FINISHED) else "stopped"

    def resume_step(self) -> int | None:
        """The step of the checkpoint a resumed run starts from: the latest that Ray Train's
        snapshot registered (a folder written after it, by a run killed before it was
        registered, is not resumed from). A snapshot that cannot be read (cut short by a
        kill) would stop every rerun in Ray: it is set aside, and the run starts again."""
        if not self._exists(RAY_SNAPSHOT):
            return None
        try:
            latest = self._read(RAY_SNAPSHOT)["latest_checkpoint_result"] or {}
            name = latest.get("checkpoint_dir_name", "")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            aside = f"{RAY_SNAPSHOT}.unreadable"
            self.fs.move(f"{self.path}/{RAY_SNAPSHOT}", f"{self.path}/{aside}")
            log.warning("Ray Train's checkpoint record %s/%s is unreadable (%s); set it aside as %s: "
                        "distillation starts again from step 0", self.where, RAY_SNAPSHOT, type(e).__name__, aside)
            return None
        step = name[len(CHECKPOINT_PREFIX):]
        return int(step) if name.startswith(CHECKPOINT_PREFIX) and step.isdigit() else None

    def claim(self, settings: dict, resume: bool) -> None:
        """Refuse to mix runs: a new run needs a free name, a resumed one the same settings."""
        state = self.state
        if resume:
            self.resume_step()  # Ray Train must not find an unreadable snapshot
            if state == "new":
                raise RunConflictError(
                    f"resume=True but there is no run to resume at {self.where}; check storage_path and run_name"
                )
            changed = changed_settings(self._read(MANIFEST), settings)
            if changed:
                raise RunConflictError(
                    f"cannot resume the run at {self.where}: these settings differ from it: {changed}. "
                    "Keep them as they were to resume it, or start a new run with another run_name or storage_path"
                )
            return
        if state != "new":
            raise RunConflictError(
                f"a {state} run already exists at {self.where}; pass resume=True to continue it, "
                "or choose another run_name or storage_path"
            )
        self._write(MANIFEST, settings)

    def mark_finished(self, rows_dir: str) -> None:
        self._write(FINISHED, {"rows_dir": rows_dir})
