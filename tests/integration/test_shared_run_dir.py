"""A cluster whose run_dir, or out_path, one node cannot see: the job says so in one line
before any work. The node runs in a mount namespace of its own with an empty filesystem over the
runs' folder, as a node without the shared mount would be."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import REPO_ROOT, free_ports
from tests.helpers import tiny_job_args

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
JOIN_AND_RUN = """
import json, sys
from tokdist_ray.job.cli import main
sys.exit(main(["run", *json.loads(sys.argv[1])]))
"""


NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port")


def _node_ports(ports: list[int]) -> list[str]:
    """Ports of its own for every Ray process of a node: two nodes share this machine."""
    return [f"--{name}={port}" for name, port in zip(NODE_PORTS, ports, strict=True)]


def _start(command: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def _wait_for_nodes(address: str, env: dict, count: int) -> None:
    probe = f"import ray; ray.init(address={address!r}); print(sum(n['Alive'] for n in ray.nodes()))"
    deadline = time.time() + 180
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise RuntimeError(f"the cluster did not reach {count} nodes")


def test_a_run_dir_one_node_cannot_see_is_one_line_before_any_work(tiny_model_dir, job_corpus_dir, tmp_path):
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("this test starts a node in a mount namespace of its own, which needs root (unshare -m)")
    runs = tmp_path / "runs"
    runs.mkdir()
    path = os.pathsep.join([str(REPO_ROOT), os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_AUTH_MODE": "disabled", "PATH": path, "PYTHONPATH": str(REPO_ROOT)}
    port, *ports = free_ports(1 + 2 * len(NODE_PORTS))
    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths
    address = f"127.0.0.1:{port}"
    head = _start([*RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                   f"--temp-dir={temp}", "--disable-usage-stats", *_node_ports(ports[:len(NODE_PORTS)])], env)
    # the second node sees an empty tmpfs where the runs are: its own storage, not the driver's
    blind_node = " ".join([*RAY, "start", f"--address={address}", "--block", "--num-cpus=1",
                           *_node_ports(ports[len(NODE_PORTS):])])
    node = _start(["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f"mount -t tmpfs none {runs} && exec {blind_node}"], env)
    def job(run_dir, *extra):
        return subprocess.run([sys.executable, "-c", JOIN_AND_RUN,
                               json.dumps(tiny_job_args(tiny_model_dir(tied=False), job_corpus_dir, run_dir) + [*extra])],
                              env=env | {"RAY_ADDRESS": address}, capture_output=True, text=True, timeout=600)

    try:
        _wait_for_nodes(address, env, 2)
        run_dir, seen_run_dir, out_path = runs / "run", tmp_path / "seen" / "run", runs / "model"
        blind_run_dir = job(run_dir)
        blind_out_path = job(seen_run_dir, "--out_path", str(out_path))  # the export task may run on the blind node
    finally:
        _stop(node)
        _stop(head)
        subprocess.run(["rm", "-rf", temp])
    for done, key, path in ((blind_run_dir, "run_dir", run_dir), (blind_out_path, "out_path", out_path)):
        lines = [line for line in done.stderr.splitlines() if line.startswith("tokdist-ray: error:")]
        assert done.returncode == 2, done.stderr[-3000:]
        assert len(lines) == 1 and re.search(rf"{key} {path} is not storage every node sees: nodes \['[\d.]+'\]",
                                             lines[0]), lines  # one node, by its address
        assert f"put {key} on a filesystem every node mounts" in lines[0]
    assert not (run_dir / "tokens.json").exists() and not list(run_dir.glob(".tokdist-probe-*"))
    assert not (seen_run_dir / "tokens.json").exists() and not list(runs.glob(".tokdist-probe-*"))
