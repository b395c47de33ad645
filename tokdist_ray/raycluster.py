"""The few things several stages ask of the Ray cluster."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

LOCALHOST = "127.0.0.1"
KEEP_LOGS = "TOKDIST_RAY_KEEP_RAY_LOGS"  # set to 1 to keep a local instance's session folder


def ray_is_running() -> bool:
    """Whether this process is connected to Ray (without importing it)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def joins_cluster() -> bool:
    """A run joins a cluster only when told where it is (`ray job submit` sets RAY_ADDRESS):
    never one that another user happened to `ray start` on this host."""
    return bool(os.environ.get("RAY_ADDRESS"))


def connect() -> None:
    """Join the cluster at RAY_ADDRESS, or start a local instance of this process's own.

    A local instance listens on localhost only, and keeps its session folder and its
    workers' temp files in one folder, removed when this process exits."""
    import logging

    import ray

    if ray.is_initialized():
        return
    if joins_cluster():  # Ray's INFO start-up lines stay in its session logs
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        return
    # short: Ray's socket paths under it must stay within the 107 bytes of a Unix socket
    root = tempfile.mkdtemp(prefix="tokdist-ray-")
    workers_tmp = os.path.join(root, "tmp")
    os.makedirs(workers_tmp)
    ray.init(
        address="local", _node_ip_address=LOCALHOST, _temp_dir=root, logging_level=logging.WARNING,
        runtime_env={"env_vars": {"TMPDIR": workers_tmp}},
    )
    atexit.register(_remove_local_instance, root)


def _remove_local_instance(root: str) -> None:
    import ray

    ray.shutdown()
    if os.environ.get(KEEP_LOGS) != "1":
        shutil.rmtree(root, ignore_errors=True)


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
