"""The few things several stages ask of the Ray cluster."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from tokdist_ray.errors import RayStartError

KEEP_LOGS = "TOKDIST_RAY_KEEP_RAY_LOGS"  # set to 1 to keep a local instance's session folder


def ray_is_running() -> bool:
    """Whether this process is connected to Ray (without importing it)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def use_assigned_cpus() -> None:
    """torch's threads set to the CPUs Ray assigned the running task. Ray sets
    OMP_NUM_THREADS when it starts a worker process, from the first task it runs; a worker
    it reuses for a task that asks for more CPUs keeps the old count (the export's 1 CPU,
    then the evaluation's 2: half the cores idle)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))


def joins_cluster() -> bool:
    """A run joins a cluster only when told where it is (`ray job submit` sets RAY_ADDRESS):
    never one that another user happened to `ray start` on this host."""
    return bool(os.environ.get("RAY_ADDRESS"))


def connect() -> None:
    """Join the cluster at RAY_ADDRESS, or start a local instance of this process's own.

    A local instance keeps its session folder and what its processes leave in the temp
    dir under one folder, removed when this process exits. Every one of its processes
    listens on localhost only, on ports the system picks, so a `ray start --head` on Ray's
    default ports works beside it; its token (token authentication is on by default in
    Ray 2.60) is readable by this user only."""
    import ray

    if ray.is_initialized():
        return
    from tokdist_ray.console import drop_ray_notices

    sigterm = signal.getsignal(signal.SIGTERM)
    if joins_cluster():
        _join()
    else:
        _start_local()
    if threading.current_thread() is threading.main_thread():
        # ray.init sets a SIGTERM handler of its own (sys.exit), then Ray's core puts a C++ one over it
        # that prints a stack dump and aborts (exit 134): back to the application's (the CLI's), or Ray's.
        keep = sigterm if sigterm not in (None, signal.SIG_DFL) else signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, keep)
    drop_ray_notices()


def _join() -> None:
    import logging

    import ray
    from ray._private.services import canonicalize_bootstrap_address_or_die

    address = os.environ["RAY_ADDRESS"]
    # Ray Train's placement-group cleaner, an actor, asks the state API about the run; with no
    # address in its environment it looks for every Ray instance on its host and, beside another
    # one (a local job, a test's), logs "Found multiple active Ray instances" every few seconds.
    env = {}
    if "RAY_API_SERVER_ADDRESS" not in os.environ:  # a job's own setting wins
        env["RAY_API_SERVER_ADDRESS"] = address if "://" in address else canonicalize_bootstrap_address_or_die(address)
    # Ray's INFO start-up lines stay in its session logs
    ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": env})


def _start_local() -> None:
    import logging

    import psutil
    import ray

    root = tempfile.mkdtemp(prefix="tokdist-ray-", dir=_short_temp_dir())
    workers_tmp = os.path.join(root, "tmp")
    os.makedirs(workers_tmp)
    # Ray's processes inherit the environment ray.init starts them in: TMPDIR, so that what they
    # leave (multiprocessing's pymp-* folders) goes under root too; the address of this instance's
    # dashboard, so that state-API calls inside them (Ray Train's placement-group cleaner) find this
    # instance, not "multiple active Ray instances" on a shared machine; and free ports for the
    # dashboard's and the autoscaler's metrics, which are fixed (44227, 44217) otherwise.
    dashboard_port = _free_port()
    inherited = {"TMPDIR": workers_tmp, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
                 "DASHBOARD_METRIC_PORT": str(_free_port()), "AUTOSCALER_METRIC_PORT": str(_free_port())}
    outer = {name: os.environ.get(name) for name in inherited}
    os.environ.update(inherited)
    # Ray 2.60 turns token authentication on for a new local instance and warns that it did:
    # this instance is private to this process and manages its own token, so the notice says
    # nothing a user can act on. (Setting RAY_AUTH_MODE=token instead does not work once Ray is
    # imported: its config is read at import and the init then fails to authenticate.)
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    auth_level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        _private_token()
        with _single_host_node():
            ray.init(address="local", _temp_dir=root, logging_level=logging.WARNING, dashboard_host="127.0.0.1",
                     dashboard_port=dashboard_port)
    except BaseException as e:
        logs = _stop_failed_start(root, children)
        if not isinstance(e, Exception):  # Ctrl-C or SIGTERM while Ray starts: stopped, not failed
            raise
        what = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RayStartError(f"the job's local Ray instance did not start ({what}); if its start-up timed out on a "
                            f"busy machine, run the job again, or join a running cluster with RAY_ADDRESS; {logs}") from e
    finally:
        auth_log.setLevel(auth_level)
        for name, value in outer.items():  # this process and its other children keep their own
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    atexit.register(_remove_local_instance, root)


@contextmanager
def _single_host_node():
    """ray.init as Ray starts a node on macOS: its node IP is 127.0.0.1, so its GCS, raylet, agents
    and metrics endpoints listen on localhost only (on Linux Ray takes the host's outward IP and
    binds them to every interface); and its dashboard agent's HTTP port is one the system picks
    (0), as in Ray's own multi-node test clusters: ray.init has no option for it and leaves Ray's
    fixed 52365, which a `ray start --head` beside this instance then cannot bind ("No available
    agent to submit job")."""
    from ray._private import parameter, ray_constants

    fixed = parameter.RayParams

    class OwnPorts(fixed):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.dashboard_agent_listen_port = 0

    enabled = ray_constants.ENABLE_RAY_CLUSTER
    parameter.RayParams, ray_constants.ENABLE_RAY_CLUSTER = OwnPorts, False
    try:
        yield
    finally:
        parameter.RayParams, ray_constants.ENABLE_RAY_CLUSTER = fixed, enabled


def _private_token() -> None:
    """Ray guards a new local instance with the token in ~/.ray/auth_token and, when there is
    none, writes one that everyone on the host can read (mode 0644). Write it first, readable by
    this user only, and tighten one Ray wrote so. Not when the token comes from RAY_AUTH_TOKEN or
    RAY_AUTH_TOKEN_PATH, or RAY_AUTH_MODE=disabled turns authentication off."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or \
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    token = Path.home() / ".ray" / "auth_token"
    token.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if token.stat().st_mode & 0o077:
            token.chmod(0o600)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # as Ray's own: 256 random bits


def _stop_failed_start(root: str, children: set[int]) -> str:
    """Stop what a failed start left running (processes of this one, unknown to Ray once its
    init raised) and remove its folder unless asked to keep the logs; says where they are."""
    import psutil
    import ray

    ray.shutdown()
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in children]
    for process in started:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(started, timeout=10)  # reaped, not left as zombies
    if os.environ.get(KEEP_LOGS) == "1":
        return f"its logs are in {root}"
    shutil.rmtree(root, ignore_errors=True)
    return f"{KEEP_LOGS}=1 keeps its logs"


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


def node_id() -> str:
    """The Ray node this process runs on ("local" outside Ray): reports say where work ran."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
