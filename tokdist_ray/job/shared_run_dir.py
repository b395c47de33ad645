"""On a cluster, run_dir must be storage every node sees: miners write snippets there that
the GPU workers read, rank 0 writes the model and report there for the driver; so must an
out_path, which the export task writes on whichever node it runs. A node-local one fails
only stages later (or the model lands on a node's own disk); this finds it before any
work, with a file the driver writes and a task on every other node reads."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from tokdist_ray.atomic import atomic_write_text
from tokdist_ray.errors import ConfigError

log = logging.getLogger("tokdist_ray")
PROBE_TIMEOUT_S = 120.0


def check_shared(key: str, directory: Path, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise one line naming the nodes that cannot read a file written into `directory` (the
    setting `key`; the nearest folder of it that exists, where it does not yet) here. Nodes
    launched later (an autoscaling cluster starts empty) are not probed: their first read of
    a missing file says the same (training/snippet_files.py)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    if not nodes:
        return
    existing = next(p for p in (directory, *directory.parents) if p.is_dir())
    token = uuid.uuid4().hex
    probe = existing / f".tokdist-probe-{token}"
    atomic_write_text(probe, token)
    try:
        seen = _read_on_each(nodes, str(probe), timeout_s)
    finally:
        probe.unlink(missing_ok=True)
    blind = [n["NodeManagerAddress"] for n in nodes if n["NodeID"] in seen and seen[n["NodeID"]] != token]
    silent = [n["NodeManagerAddress"] for n in nodes if n["NodeID"] not in seen]
    if silent:
        log.warning("nodes %s did not answer the shared-storage check within %.0f s; not checked", silent, timeout_s)
    if blind:
        raise ConfigError(
            f"{key} {directory} is not storage every node sees: nodes {blind} cannot read a file written there on "
            f"the driver's node; put {key} on a filesystem every node mounts at the same path (/shared in "
            "cluster/*.yaml: EFS, Filestore, a ReadWriteMany volume)"
        )


def _read_on_each(nodes: list[dict], path: str, timeout_s: float) -> dict[str, str | None]:
    """{node id: what `path` holds there (None: no such file)} for the nodes that answered."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    read = ray.remote(num_cpus=0)(_read)  # 0 CPUs: a 0-CPU head or a busy node answers too
    pending = {read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(path):
               n["NodeID"] for n in nodes}
    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    return {pending[ref]: ray.get(ref) for ref in ready}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
