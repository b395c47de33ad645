"""The few things several stages ask of the Ray cluster."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

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

    A local instance keeps its session folder and what its processes leave in the temp
    dir under one folder, removed when this process exits. (Its dashboard listens on
    localhost; Ray's core refuses a loopback node IP and guards its ports with token
    authentication, on by default in Ray 2.60.)"""
    import logging

    import ray

    if ray.is_initialized():
        return
    if joins_cluster():  # Ray's INFO start-up lines stay in its session logs
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        return
    root = tempfile.mkdtemp(prefix="tokdist-ray-", dir=_short_temp_dir())
    workers_tmp = os.path.join(root, "tmp")
    os.makedirs(workers_tmp)
    # Ray's processes inherit TMPDIR: what they leave (multiprocessing's pymp-* folders) goes under root too
    outer_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = workers_tmp
    # Ray 2.60 turns token authentication on for a new local instance and warns that it did:
    # this instance is private to this process and manages its own token, so the notice says
    # nothing a user can act on. (Setting RAY_AUTH_MODE=token instead does not work once Ray is
    # imported: its config is read at import and the init then fails to authenticate.)
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    auth_level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    try:
        ray.init(address="local", _temp_dir=root, logging_level=logging.WARNING)
    finally:
        auth_log.setLevel(auth_level)
        if outer_tmp is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = outer_tmp
    atexit.register(_remove_local_instance, root)


def _short_temp_dir() -> str:
    """The temp dir, or /tmp when it is too long: Ray's sockets live 62 bytes below the
    session root, within the 107 bytes a Unix socket path may have."""
    base = tempfile.gettempdir()
    return base if len(base) + len("/tokdist-ray-xxxxxxxx") + 62 <= 107 else "/tmp"


def _remove_local_instance(root: str) -> None:
    import ray

    ray.shutdown()
    if os.environ.get(KEEP_LOGS) != "1":
        shutil.rmtree(root, ignore_errors=True)


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
