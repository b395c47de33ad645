"""The few things several stages ask of the Ray cluster."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
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
    from tokdist_ray.console import drop_ray_notices

    if joins_cluster():  # Ray's INFO start-up lines stay in its session logs
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        drop_ray_notices()
        return
    root = tempfile.mkdtemp(prefix="tokdist-ray-", dir=_short_temp_dir())
    workers_tmp = os.path.join(root, "tmp")
    os.makedirs(workers_tmp)
    # Ray's processes inherit the environment ray.init starts them in: TMPDIR, so that what they
    # leave (multiprocessing's pymp-* folders) goes under root too; and the address of this
    # instance's dashboard, so that state-API calls inside them (Ray Train's placement-group
    # cleaner) find this instance, not "multiple active Ray instances" on a shared machine.
    dashboard_port = _free_port()
    inherited = {"TMPDIR": workers_tmp, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}
    outer = {name: os.environ.get(name) for name in inherited}
    os.environ.update(inherited)
    # Ray 2.60 turns token authentication on for a new local instance and warns that it did:
    # this instance is private to this process and manages its own token, so the notice says
    # nothing a user can act on. (Setting RAY_AUTH_MODE=token instead does not work once Ray is
    # imported: its config is read at import and the init then fails to authenticate.)
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    auth_level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    try:
        ray.init(address="local", _temp_dir=root, logging_level=logging.WARNING, dashboard_host="127.0.0.1",
                 dashboard_port=dashboard_port)
    finally:
        auth_log.setLevel(auth_level)
        for name, value in outer.items():  # this process and its other children keep their own
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    drop_ray_notices()
    atexit.register(_remove_local_instance, root)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


def node_id() -> str:
    """The Ray node this process runs on ("local" outside Ray): reports say where work ran."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
